"""Relative position biases (T5) for attention over [prefix ; keys], counted as AdapterHub counts them.

AdapterHub computes T5's bias after prepending the prefix, so key positions start at the first prefix
position: a row with P prefix positions sees its real key j at position P + j. Rows of a mixed batch carry
different P (left-padded, masked); each row's bias is computed with its own offset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def extend_position_bias(module: nn.Module, bias: torch.Tensor, keep: torch.Tensor, q_len: int,
                         k_len: int) -> torch.Tensor:
    """`bias` [1 or B, heads, q, k_len] widened to the prefix block `keep` [B, P] in front of the keys."""
    p = keep.shape[1]
    source = module.__dict__.get("_adapterserve_bias")
    if source is None:
        return F.pad(bias, (p, 0))
    past = k_len - q_len
    offsets = p - keep.sum(dim=1)
    distinct = sorted({int(d) for d in offsets.tolist()})
    blocks = [source.compute_bias(q_len, p + k_len, device=bias.device, past_seen_tokens=past + d) for d in distinct]
    if len(blocks) == 1:
        return blocks[0].to(bias.dtype)
    index = torch.tensor([distinct.index(int(d)) for d in offsets.tolist()], device=bias.device)
    return torch.cat(blocks).index_select(0, index).to(bias.dtype)
