"""Relative position biases (T5) for attention over [prefix ; keys], counted as AdapterHub counts them.

AdapterHub computes T5's bias after prepending the prefix, so key positions start at the first prefix
position: a row with P prefix positions sees its real key j at position P + j. Rows of a mixed batch carry
different P (left-padded, masked); each row's bias is computed with its own offset. `compute_bias` may answer
one bias for all rows ([1, heads, q, k], as transformers' T5 does) or one per row ([B, heads, q, k]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...routing import ForwardContext, shared_tensor


def extend_position_bias(module: nn.Module, bias: torch.Tensor, keep: torch.Tensor, q_len: int,
                         k_len: int) -> torch.Tensor:
    """`bias` [1 or B, heads, q, k_len] widened to the prefix block `keep` [B, P] in front of the keys."""
    p = keep.shape[1]
    source = module.__dict__.get("_adapterserve_bias")
    if source is None:
        return F.pad(bias, (p, 0))
    ctx = ForwardContext.current()
    lengths = _host_lengths(module, ctx)
    offsets = tuple(p - n for n in lengths) if lengths is not None else tuple(int(d) for d in (p - keep.sum(dim=1)).tolist())
    key = ("relative_bias", id(source), q_len, k_len, offsets, bias.dtype)
    cached = ctx.prefix_states.get(key) if ctx is not None else None
    if cached is None:
        cached = _compute(source, q_len, k_len, p, offsets, bias)
        if ctx is not None:  # every later layer of the same stack reuses it, as T5 reuses its bias
            ctx.prefix_states[key] = cached
    return cached


def _host_lengths(module: nn.Module, ctx: ForwardContext | None) -> list[int] | None:
    """Each row's prefix length, as the routing computed it on the host for this attention module's layer."""
    if ctx is None:
        return None
    return ctx.prefix_states.get(("lengths", getattr(module, "_adapterserve_location", None),
                                  getattr(module, "_adapterserve_layer", None)))


def _compute(source: nn.Module, q_len: int, k_len: int, p: int, offsets: tuple[int, ...],
             bias: torch.Tensor) -> torch.Tensor:
    past = k_len - q_len
    distinct = sorted(set(offsets))
    blocks = [source.compute_bias(q_len, p + k_len, device=bias.device, past_seen_tokens=past + d) for d in distinct]
    if len(blocks) == 1:
        return blocks[0].to(bias.dtype)
    index = shared_tensor([distinct.index(d) for d in offsets], bias.device)
    if blocks[0].shape[0] == 1:
        return torch.cat(blocks).index_select(0, index).to(bias.dtype)
    # compute_bias answered one bias per row (a caller decoding rows at different positions, such as the server's
    # seq2seq generator, makes it so): row r takes its own row of its offset's block
    rows = torch.arange(len(offsets), device=bias.device)
    return torch.stack(blocks)[index, rows].to(bias.dtype)
