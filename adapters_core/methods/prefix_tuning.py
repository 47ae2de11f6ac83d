"""Prefix tuning: learned key/value rows prepended to every attention layer's keys and values.

Parameters follow AdapterHub's layout: reparameterised `wte` (prefix_length x hidden) through
`control_trans` = Linear -> act -> Linear to n_layers*2*n_kv_heads*head_dim, or a flat `control_trans`
vector. One attention wrapper prepends each row's own prefix (padded and masked when rows differ), so a
heterogeneous batch stays one attention call and no row sees another row's prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .bottleneck import Activation

KV = tuple[torch.Tensor, torch.Tensor]


class PrefixTuningModule(nn.Module):
    """The prefixes of one adapter for all layers; `key_values()` is cached while the weights are unchanged."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, hidden: int, config: object):
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
    index = torch.tensor([s + 1 for s in slot], device=device)
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


def extend_mask(
    mask: torch.Tensor | None, keep: torch.Tensor, q_len: int, k_len: int, causal: bool,
    dtype: torch.dtype, as_bool: bool,
) -> torch.Tensor:
    """The attention mask for [prefix ; keys]: prefix columns visible where `keep`, the rest as given."""
    b, p = keep.shape
    device = keep.device
    if mask is None:
        if causal and q_len > 1:
            offset = k_len - q_len
            base = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)
        else:
            base = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        mask = base.expand(b, 1, q_len, k_len)
        if not as_bool:
            mask = _to_additive(mask, dtype)
    if mask.dim() == 2:
        mask = mask[:, None, None, :].expand(b, 1, q_len, mask.shape[-1])
    mb = mask.shape[0]
    if mask.dtype == torch.bool:
        cols = keep[:, None, None, :].expand(b, 1, mask.shape[2], p)
    else:
        cols = _to_additive(keep, mask.dtype)[:, None, None, :].expand(b, 1, mask.shape[2], p)
    if mb != b:
        mask = mask.expand(b, *mask.shape[1:])
    return torch.cat([cols, mask.expand(b, mask.shape[1], mask.shape[2], mask.shape[3])], dim=-1)


def _to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, neg)


PrefixLookup = Callable[[nn.Module, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]


def make_prefix_attention(delegate: Callable[..., Any], lookup: PrefixLookup, as_bool: bool,
                          cpu_kv_multiple: int = 1) -> Callable[..., Any]:
    """Wrap an attention function so it prepends the routed rows' prefixes to key and value.

    cpu_kv_multiple > 1: on CPU, masked zero positions pad [prefix ; keys] to a multiple of it. torch's CPU
    flash-attention kernel is up to 2x slower on key lengths off its block size (30 prefix + 64 tokens: 94
    keys cost about as much as 128), and masked positions add exactly nothing to the result.
    """

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        found = lookup(module, key.shape[0])
        if found is None:
            return delegate(module, query, key, value, attention_mask, **kwargs)
        pk, pv, keep = found
        pad = -(key.shape[2] + pk.shape[2]) % cpu_kv_multiple if key.device.type == "cpu" else 0
        front_k, front_v = [pk.to(key.dtype)], [pv.to(value.dtype)]
        if pad:
            zeros = key.new_zeros(()).expand(pk.shape[0], pk.shape[1], pad, pk.shape[3])
            front_k.insert(0, zeros)
            front_v.insert(0, zeros)
            keep = torch.cat([keep.new_zeros(()).expand(keep.shape[0], pad), keep], dim=1)
        causal = bool(getattr(module, "is_causal", False))
        if attention_mask is None and not (causal and query.shape[2] > 1):
            if bool(keep.all()):
                mask = None  # every key visible to every query: keep the mask-free kernel
            else:  # only prefix columns are hidden, alike for every query: one broadcast row per batch row
                cols = torch.cat([keep, keep.new_ones(()).expand(keep.shape[0], key.shape[2])], dim=1)
                mask = (cols if as_bool else _to_additive(cols, query.dtype))[:, None, None, :]
        else:
            mask = extend_mask(attention_mask, keep, query.shape[2], key.shape[2], causal, query.dtype, as_bool)
        key = torch.cat([*front_k, key], dim=2)
        value = torch.cat([*front_v, value], dim=2)
        kwargs.pop("is_causal", None)
        return delegate(module, query, key, value, mask, is_causal=False, **kwargs)

    return attention
