"""Stacked adapter weights, reused across forward passes while no weight changed.

A mixed batch runs same-shaped adapters as one batched matmul over their weights stacked into one
[S, in, out] tensor; building that stack copies the weights, so inference keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["StackCache", "stack_params"]

Pair = tuple[torch.Tensor, torch.Tensor | None]


def stack_params(params: Sequence[Pair]) -> Pair:
    """(weights, biases) of several layers as [S, in, out] (transposed) and [S, out] (None without biases)."""
    # stacked already transposed: a contiguous [S, in, out] right operand is the fast bmm layout
    w_t = torch.stack([p[0].t() for p in params])
    biases = [p[1] for p in params]
    ref = next((b for b in biases if b is not None), None)
    if ref is None:
        return w_t, None
    # slots may mix biased and bias-free layers (phm_bias=False): the latter add zero
    return w_t, torch.stack([torch.zeros_like(ref) if b is None else b for b in biases])


class StackCache:
    """Stacked weights of a group of adapters, reused across forward passes while no weight changed.

    Only used when no gradient is recorded; the key holds the parameters' identities and the stamp
    their storage and in-place version counters, so a reload or an optimizer step invalidates it.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple, Pair]] = {}

    def get(self, params: Sequence[Pair]) -> Pair:
        flat = [t for pair in params for t in pair if t is not None]
        if any(not isinstance(t, nn.Parameter) for t in flat):
            return stack_params(params)  # computed per forward (Compacter's PHM products): nothing to keep
        key = tuple(id(t) for t in flat)
        stamp = tuple((t.data_ptr(), t._version) for t in flat)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = stack_params(params)
        if len(self._entries) > 64:
            self._entries.clear()
        self._entries[key] = (stamp, value)
        return value
