"""Bottleneck adapters applied to the rows of a mixed batch: one batched matmul per group of same-shaped adapters.

A location hands us h (the sublayer output), x (the residual input) and the model's LayerNorm (or None
for pre-LN models). `apply_bottlenecks` returns the value *before* the model's own residual/LayerNorm
step ("pre-final"), so the host keeps doing that step itself and rows without adapters stay untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...routing import shared_tensor
from ..batching import row_index, segment_runs
from ..stack_cache import StackCache, stack_params
from .adapter import BottleneckAdapter


@dataclass(frozen=True)
class BottleneckResult:
    """Pre-final values for `rows` (None = all rows), and whether the host still applies its LN/residual."""

    value: torch.Tensor | LowRankUpdate  # a LowRankUpdate only for delta results at inference
    rows: torch.Tensor | slice | None  # an index tensor, a contiguous run, or None for all rows
    original_ln_after: bool
    delta: bool = False  # value is an update to add onto the host's own sum (see delta_form)


def _gathered_linear(
    x: torch.Tensor, params: Sequence[tuple[torch.Tensor, torch.Tensor | None]], row_slot: torch.Tensor | None,
    scale: float = 1.0, cache: StackCache | None = None,
) -> torch.Tensor:
    """Row r of x times the weight of slot row_slot[r] (times `scale`), for all rows in one (b)addbmm.

    row_slot None: row r uses slot r (one row per adapter, in order), so no gather is needed.
    """
    if cache is not None and not torch.is_grad_enabled():
        w_t, b = cache.gather(params, row_slot)
    else:
        w_t, b = stack_params(params)
        if row_slot is not None:
            w_t = w_t[row_slot]
            b = None if b is None else b[row_slot]
    if b is None:
        y = torch.bmm(x, w_t)
        return y * scale if scale != 1.0 else y
    return torch.baddbmm(b[:, None, :], x, w_t, beta=scale, alpha=scale)


def _scaled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """scale * (x @ W^T + b) in one BLAS call."""
    flat = x.reshape(-1, x.shape[-1])
    if bias is None:
        y = flat @ weight.t()
        y = y * scale if scale != 1.0 else y
    else:
        y = torch.addmm(bias, flat, weight.t(), beta=scale, alpha=scale)
    return y.view(*x.shape[:-1], weight.shape[0])


@dataclass(frozen=True)
class LowRankUpdate:
    """scale * act @ weight_t, kept factored so that inference adds it to the host's sum with one
    accumulating matmul (no full-size temporary, no separate bias or add pass)."""

    act: torch.Tensor  # [..., k]
    weight_t: torch.Tensor  # [k, out]
    scale: float

    def dense(self) -> torch.Tensor:
        y = self.act @ self.weight_t
        return y * self.scale if self.scale != 1.0 else y


def _up_factor(adapter: BottleneckAdapter, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """adapter_up's weight as [k (+1), out]: transposed, with the bias as a last row that a ones column in
    the activation picks up. Cached on the adapter until the weight or bias storage or version changes;
    computed weights (Compacter's PHM products, possibly inference tensors without a version) are not cached."""
    parts = [t for t in (weight, bias) if t is not None]
    if not all(isinstance(t, nn.Parameter) for t in parts):
        return _factor(weight, bias)
    stamp = tuple((t.data_ptr(), t._version, t.dtype) for t in parts)
    cached = adapter.__dict__.get("_up_factor")
    if cached is None or cached[0] != stamp:
        cached = (stamp, _factor(weight, bias))
        adapter.__dict__["_up_factor"] = cached
    return cached[1]


def _factor(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return (weight.t() if bias is None else torch.cat([weight.t(), bias[None]])).contiguous()


def _delta_single(adapter: BottleneckAdapter, z: torch.Tensor, factored: bool = False) -> torch.Tensor | LowRankUpdate:
    """The adapter's update for input z; `factored` (inference only) returns it as a LowRankUpdate."""
    (wd, bd), (wu, bu) = adapter.linear_params()
    act = adapter.adapter_down[-1]
    down = act(_scaled_linear(z, wd, bd, 1.0))
    if not factored:
        return _scaled_linear(down, wu, bu, adapter.scaling)
    if bu is not None:
        down = F.pad(down, (0, 1), value=1.0)
    return LowRankUpdate(down, _up_factor(adapter, wu, bu), adapter.scaling)


def _delta_gathered(adapters: Sequence[BottleneckAdapter], row_slot: torch.Tensor | None, z: torch.Tensor,
                    cache: StackCache | None = None) -> torch.Tensor:
    downs, ups = zip(*(a.linear_params() for a in adapters), strict=True)
    act = adapters[0].adapter_down[-1]
    down = _gathered_linear(z, downs, row_slot, cache=cache)
    return _gathered_linear(act(down), ups, row_slot, adapters[0].scaling, cache=cache)


def _run_gathered(
    adapters: Sequence[BottleneckAdapter], row_slot: torch.Tensor, h: torch.Tensor, x: torch.Tensor,
    layer_norm: nn.Module | None,
) -> torch.Tensor:
    lead = adapters[0]
    z, residual = lead.pre_forward(h, x, layer_norm)
    downs, ups = zip(*(a.linear_params() for a in adapters), strict=True)
    act = lead.adapter_down[-1]
    up = _gathered_linear(act(_gathered_linear(z, downs, row_slot)), ups, row_slot) * lead.scaling
    return lead.pre_final(lead.finish(up, residual), h)


def _run_stack(
    stack: Sequence[BottleneckAdapter], h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module | None
) -> torch.Tensor:
    hidden = h
    for adapter in stack:
        z, residual = adapter.pre_forward(hidden, x, layer_norm)
        hidden = adapter(z, residual)
    return stack[-1].pre_final(hidden, h)


def apply_bottlenecks(
    adapters: nn.ModuleDict,
    groups: Sequence[tuple[tuple[str, ...], Sequence[int]]],
    h: torch.Tensor,
    x: torch.Tensor,
    layer_norm: Callable[[torch.Tensor], torch.Tensor] | None,
    hx: torch.Tensor | None = None,
    cache: StackCache | None = None,
) -> list[BottleneckResult]:
    """Run every routed row through its adapter stack; rows sharing a signature share one bmm.

    `hx` is h + x when the host has computed it already (BERT's LayerNorm input).
    """
    n_rows = h.shape[0]
    results: list[BottleneckResult] = []
    batched: dict[tuple, list[tuple[BottleneckAdapter, Sequence[int]]]] = {}
    for names, rows in groups:
        stack = [adapters[n] for n in names]
        if len(stack) == 1 and stack[0].batchable:
            key = (stack[0].signature(), stack[0].config.original_ln_after, stack[0].delta_form)
            batched.setdefault(key, []).append((stack[0], rows))
            continue
        idx = row_index(rows, n_rows, h.device)
        hs, xs = (h, x) if idx is None else (h[idx], x[idx])
        results.append(BottleneckResult(_run_stack(stack, hs, xs, layer_norm), idx, stack[-1].config.original_ln_after))
    inference = not torch.is_grad_enabled()
    for (_, ln_after, delta), members in batched.items():
        runs = segment_runs(members, n_rows) if inference else None
        if runs is not None:
            results.extend(_run_segments(runs, h, x, hx, layer_norm, ln_after, delta))
            continue
        all_rows = [r for _, rows in members for r in rows]
        idx = row_index(all_rows, n_rows, h.device)
        hs, xs = (h, x) if idx is None else (h[idx], x[idx])
        hxs = hx if idx is None or hx is None else hx[idx]
        lead = members[0][0]
        slots = [i for i, (_, rows) in enumerate(members) for _ in rows]
        slot = None if len(members) == 1 else shared_tensor(slots, h.device)
        if delta:
            z = lead.delta_input(hs, xs, hxs, layer_norm)
            if slot is None:
                up = _delta_single(lead, z)
            else:
                one_each = slots == list(range(len(members)))  # one row per adapter, in order: no gather
                up = _delta_gathered([a for a, _ in members], None if one_each else slot, z, cache)
            results.append(BottleneckResult(up, idx, True, delta=True))
        elif slot is None:
            results.append(BottleneckResult(_run_stack([lead], hs, xs, layer_norm), idx, ln_after))
        else:
            results.append(BottleneckResult(_run_gathered([a for a, _ in members], slot, hs, xs, layer_norm), idx, ln_after))
    return results


def _run_segments(
    runs: Sequence[tuple[BottleneckAdapter, list[slice | None]]], h: torch.Tensor, x: torch.Tensor,
    hx: torch.Tensor | None, layer_norm: Callable[[torch.Tensor], torch.Tensor] | None, ln_after: bool, delta: bool,
) -> list[BottleneckResult]:
    """Inference: each adapter on its contiguous runs of rows, read and written through slices (views),
    so a few long runs cost a few plain matmuls and no gather, per-row weight copy or scatter."""
    results: list[BottleneckResult] = []
    for adapter, slices in runs:
        for sl in slices:
            hs, xs = (h, x) if sl is None else (h[sl], x[sl])
            if delta:
                hxs = hx if hx is None or sl is None else hx[sl]
                up = _delta_single(adapter, adapter.delta_input(hs, xs, hxs, layer_norm), factored=True)
                results.append(BottleneckResult(up, sl, True, delta=True))
            else:
                results.append(BottleneckResult(_run_stack([adapter], hs, xs, layer_norm), sl, ln_after))
    return results


def add_rows(base: torch.Tensor, rows: torch.Tensor | slice | None, value: torch.Tensor | LowRankUpdate) -> torch.Tensor:
    """base + value on `rows` (all when None); in place when no gradient is being recorded."""
    if isinstance(value, LowRankUpdate):
        if not torch.is_grad_enabled() and not isinstance(rows, torch.Tensor) and base.is_contiguous():
            block = base if rows is None else base[rows]
            block.view(-1, block.shape[-1]).addmm_(
                value.act.reshape(-1, value.act.shape[-1]), value.weight_t, alpha=value.scale
            )
            return base
        value = value.dense()
    inplace = not torch.is_grad_enabled() or not (base.requires_grad or value.requires_grad)
    if rows is None:
        return base.add_(value) if inplace else base + value
    if isinstance(rows, slice):
        if inplace:
            base[rows].add_(value)
            return base
        rows = torch.arange(rows.start, rows.stop, device=base.device)
    return base.index_add_(0, rows, value) if inplace else base.index_add(0, rows, value)


def merge_rows(base: torch.Tensor, results: Sequence[BottleneckResult], fn: Callable[[BottleneckResult], torch.Tensor]) -> torch.Tensor:
    """Write each result's transformed rows into a copy of `base` (or return it when it covers all rows)."""
    if len(results) == 1 and results[0].rows is None:
        return fn(results[0])
    out = base.clone()
    for res in results:
        value = fn(res)
        if res.rows is None:
            out = value
        elif isinstance(res.rows, slice):
            out[res.rows] = value
        else:
            out = out.index_copy(0, res.rows, value)
    return out
