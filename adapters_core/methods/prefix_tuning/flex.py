"""Prefix columns for flex_attention: a BlockMask over [prefix ; keys] built from the model's own mask_mod.

transformers hands flex_attention a BlockMask (or an additive score mask, or nothing); the prefix keys need
columns of their own. The new mask_mod shows prefix column j where the row keeps it and shifts every other
column back onto the original mask_mod, so the model's causal, padding and offset rules hold unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

#: flex_attention's mask_mod: (batch, head, q_idx, kv_idx) -> visible.
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_CACHE_ATTR = "_adapterserve_prefixed"


def _causal(offset: int) -> MaskMod:
    def mask_mod(batch: torch.Tensor, head: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return kv <= q + offset
    return mask_mod


def prefixed_block_mask(
    mask: BlockMask | None, keep: torch.Tensor, q_len: int, k_len: int, causal: bool, full: bool | None = None
) -> BlockMask | None:
    """The BlockMask for [prefix ; keys] (keep: [batch, P] visible prefix columns); None where all is visible.

    Built once per (mask, keep): the layers of one forward share the model's BlockMask, which carries the result.
    `full` (every row keeps every prefix position) comes from the host; None reads it from `keep`.
    """
    if mask is not None:
        cached = getattr(mask, _CACHE_ATTR, None)
        if cached is not None and (cached[0] is keep or cached[0].shape == keep.shape and torch.equal(cached[0], keep)):
            return cached[1]
        inner: MaskMod | None = mask.mask_mod
    else:
        inner = _causal(k_len - q_len) if causal and q_len > 1 else None
        if inner is None and (bool(keep.all()) if full is None else full):
            return None
    b, p = keep.shape

    def mask_mod(batch: torch.Tensor, head: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        in_prefix = keep[batch, kv.clamp(max=p - 1)]
        if inner is None:
            return (kv >= p) | in_prefix
        return torch.where(kv >= p, inner(batch, head, q, (kv - p).clamp(min=0)), in_prefix)

    block = mask.BLOCK_SIZE if mask is not None else 128
    out = create_block_mask(mask_mod, b, None, q_len, k_len + p, device=keep.device, BLOCK_SIZE=block)
    if mask is not None:
        setattr(mask, _CACHE_ATTR, (keep, out))
    return out
