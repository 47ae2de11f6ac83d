"""Prefix tuning's module and the gathering of each row's prefixes into padded key/value blocks.

Parameters follow AdapterHub's layout: reparameterised `wte` (prefix_length x hidden) through
`control_trans` = Linear -> act -> Linear to n_layers*2*n_kv_heads*head_dim, or a flat `control_trans`
vector. Rows of a batch may carry different prefixes (or none): they are padded to the longest and the
padding masked out, so a heterogeneous batch stays one attention call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...routing import shared_tensor
from ..activations import Activation
from .config import PrefixTuningConfig

KV = tuple[torch.Tensor, torch.Tensor]


class PrefixTuningModule(nn.Module):
    """The prefixes of one adapter for all layers; `key_values()` is cached while the weights are unchanged."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, hidden: int, config: PrefixTuningConfig):
        super().__init__()
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.prefix_length = config.prefix_length
        self.flat = bool(config.flat)
        out = n_layers * 2 * n_kv_heads * head_dim
        if self.flat:
            self.control_trans = nn.Parameter(torch.randn(self.prefix_length * out))
        else:
            self.wte = nn.Embedding(self.prefix_length, hidden)
            self.control_trans = nn.Sequential(
                nn.Linear(hidden, config.bottleneck_size), Activation(config.non_linearity),
                nn.Linear(config.bottleneck_size, out),
            )
        self.dropout = nn.Dropout(config.dropout)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def reset_cached(self) -> None:
        """Forget the computed prefixes (a spare module about to get another adapter's weights)."""
        self._cache = None

    def flat_weights(self) -> torch.Tensor:
        """The (prefix_length * n_layers * 2 * n_kv_heads * head_dim) vector a flat prefix stores."""
        if self.flat:
            return self.control_trans
        return self.control_trans(self.wte.weight).reshape(-1)

    def _compute(self) -> torch.Tensor:
        kv = self.flat_weights().view(self.prefix_length, self.n_layers * 2, self.n_kv_heads, self.head_dim)
        kv = self.dropout(kv).permute(1, 2, 0, 3)  # [2L, heads, P, head_dim]
        return kv.reshape(self.n_layers, 2, self.n_kv_heads, self.prefix_length, self.head_dim)

    def stacked(self) -> torch.Tensor:
        """All prefixes as [n_layers, 2 (key, value), n_kv_heads, prefix_length, head_dim].

        Cached in eval mode without grad until a parameter changes (no MLP rerun per request).
        """
        if self.training or torch.is_grad_enabled():
            self._cache = None
            return self._compute()
        stamp = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._cache is None or self._cache[0] != stamp:
            self._cache = (stamp, self._compute())
        return self._cache[1]

    def key_values(self) -> tuple[KV, ...]:
        """Per layer (key, value), each [n_kv_heads, prefix_length, head_dim]."""
        st = self.stacked()
        return tuple((st[i, 0], st[i, 1]) for i in range(self.n_layers))


def gather_all_layers(
    modules: Sequence[PrefixTuningModule], slot: Sequence[int], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One gather for the whole forward: rows' prefixes for every layer, padded to the longest.

    `slot[r]` indexes `modules` (-1: the row has no prefix). Returns kv [B, L, 2, H, P_max, D] and the
    keep mask [B, P_max]; valid positions sit at the end of each row's prefix block.
    """
    if len(modules) == 1 and all(s == 0 for s in slot):  # one prefix for every row: a view, no copy
        st = modules[0].stacked().to(device=device, dtype=dtype)
        keep = torch.ones(len(slot), modules[0].prefix_length, dtype=torch.bool, device=device)
        return st.unsqueeze(0).expand(len(slot), *st.shape), keep
    p_max = max(m.prefix_length for m in modules)
    ref = modules[0]
    shape = (ref.n_layers, 2, ref.n_kv_heads, p_max, ref.head_dim)
    padded = [torch.zeros(shape, device=device, dtype=dtype)]
    keeps = [torch.zeros(p_max, dtype=torch.bool, device=device)]
    for m in modules:
        st = m.stacked().to(device=device, dtype=dtype)
        keep = torch.zeros(p_max, dtype=torch.bool, device=device)
        keep[p_max - m.prefix_length:] = True
        if m.prefix_length < p_max:
            st = torch.nn.functional.pad(st, (0, 0, p_max - m.prefix_length, 0))
        padded.append(st)
        keeps.append(keep)
    index = shared_tensor([s + 1 for s in slot], device)
    # index_select copies whole [L, 2, H, P, D] blocks; advanced indexing goes element by element (2-7x slower)
    return torch.stack(padded).index_select(0, index), torch.stack(keeps).index_select(0, index)


def gather_prefixes(
    per_row: Sequence[Sequence[KV]], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Stack each row's prefixes (a row may stack several, or none) into padded [B, h, P, d] and a keep mask.

    Valid prefix positions sit at the end of the block, next to the real keys; padding is masked out.
    """
    lengths = [sum(k.shape[1] for k, _ in row) for row in per_row]
    p_max = max(lengths, default=0)
    if p_max == 0:
        return None
    ref = next(k for row in per_row for k, _ in row)
    heads, head_dim = ref.shape[0], ref.shape[2]
    same = all(len(row) == 1 and row[0][0] is per_row[0][0][0] for row in per_row)
    if same:
        k, v = per_row[0][0]
        b = len(per_row)
        keep = torch.ones(b, p_max, dtype=torch.bool, device=device)
        return (k.to(dtype).unsqueeze(0).expand(b, -1, -1, -1), v.to(dtype).unsqueeze(0).expand(b, -1, -1, -1), keep)
    keys = torch.zeros(len(per_row), heads, p_max, head_dim, device=device, dtype=dtype)
    values = torch.zeros_like(keys)
    keep = torch.zeros(len(per_row), p_max, dtype=torch.bool, device=device)
    for i, row in enumerate(per_row):
        if not row:
            continue
        # AdapterHub prepends each stacked prefix in turn: the last of the stack ends up first.
        k = torch.cat([kv[0] for kv in reversed(row)], dim=1)
        v = torch.cat([kv[1] for kv in reversed(row)], dim=1)
        keys[i, :, p_max - k.shape[1]:] = k
        values[i, :, p_max - v.shape[1]:] = v
        keep[i, p_max - k.shape[1]:] = True
    return keys, values, keep
