"""The one attention wrapper: prepend each routed row's prefix to key and value, extend the mask, delegate.

transformers 5 routes every attention call through `ALL_ATTENTION_FUNCTIONS`; `install_prefix_attention`
re-registers "sdpa", "eager" and "flex_attention" once with wrappers that look up the current rows' prefixes
(after rotary embedding) and then call the original implementation, so one mechanism serves every
architecture; every other registered implementation is wrapped to refuse a prefix (rule.py).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .bias import extend_position_bias
from .flex import prefixed_block_mask
from .rule import CARRIED, PrefixLookup, refuse_packed, refusing_attention


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


def _all_kept(found: tuple) -> bool:
    """Whether every row keeps every prefix position: the lookup's host-side flag (read from keep without one)."""
    return bool(found[3]) if len(found) > 3 else bool(found[2].all())


def _to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, neg)


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
        refuse_packed(kwargs, "sdpa" if as_bool else "eager")
        pk, pv, keep = found[:3]
        full = _all_kept(found)
        pad = -(key.shape[2] + pk.shape[2]) % cpu_kv_multiple if key.device.type == "cpu" else 0
        front_k, front_v = [pk.to(key.dtype)], [pv.to(value.dtype)]
        if pad:
            zeros = key.new_zeros(()).expand(pk.shape[0], pk.shape[1], pad, pk.shape[3])
            front_k.insert(0, zeros)
            front_v.insert(0, zeros)
            keep = torch.cat([keep.new_zeros(()).expand(keep.shape[0], pad), keep], dim=1)
            full = False
        if kwargs.get("position_bias") is not None:
            kwargs["position_bias"] = extend_position_bias(module, kwargs["position_bias"], keep, query.shape[2],
                                                           key.shape[2])
        causal = bool(getattr(module, "is_causal", False))
        if attention_mask is None and not (causal and query.shape[2] > 1):
            if full:
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


def make_flex_prefix_attention(delegate: Callable[..., Any], lookup: PrefixLookup) -> Callable[..., Any]:
    """Wrap flex_attention: prefixes prepended, the model's BlockMask (or score mask) extended over them."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: BlockMask | torch.Tensor | None, **kwargs: Any) -> Any:
        found = lookup(module, key.shape[0])
        if found is None:
            return delegate(module, query, key, value, attention_mask, **kwargs)
        refuse_packed(kwargs, "flex_attention")
        pk, pv, keep = found[:3]
        q_len, k_len = query.shape[2], key.shape[2]
        causal = bool(getattr(module, "is_causal", False))
        if attention_mask is None or isinstance(attention_mask, BlockMask):
            mask = prefixed_block_mask(attention_mask, keep, q_len, k_len, causal, _all_kept(found))
        else:
            mask = extend_mask(attention_mask, keep, q_len, k_len, causal, query.dtype, as_bool=False)
        if kwargs.get("position_bias") is not None:
            raise ValueError(
                "prefix tuning under attn_implementation 'flex_attention' with a relative position bias (T5) is not "
                "supported: use 'sdpa' or 'eager' (torch's CPU flex kernels fail on T5 even without adapters)"
            )
        key = torch.cat([pk.to(key.dtype), key], dim=2)
        value = torch.cat([pv.to(value.dtype), value], dim=2)
        return delegate(module, query, key, value, mask, **kwargs)

    return attention


_INSTALLED = threading.Lock()
_DONE: list[bool] = []


def _eager_delegate(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)


def install_prefix_attention(lookup: PrefixLookup) -> None:
    """Once: prefix-aware "sdpa", "eager" and "flex_attention"; every other registered implementation refuses."""
    with _INSTALLED:
        if _DONE:
            return
        registered = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ALL_ATTENTION_FUNCTIONS}
        wrapped = {
            "sdpa": make_prefix_attention(registered["sdpa"], lookup, as_bool=True, cpu_kv_multiple=16),
            "eager": make_prefix_attention(_eager_delegate, lookup, as_bool=False),
            "flex_attention": make_flex_prefix_attention(registered["flex_attention"], lookup),
        }
        assert set(wrapped) == set(CARRIED)
        for name, function in registered.items():
            wrapped.setdefault(name, refusing_attention(name, function, lookup))
        for name, function in wrapped.items():
            ALL_ATTENTION_FUNCTIONS.register(name, function)
        _DONE.append(True)
