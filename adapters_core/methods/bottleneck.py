"""Bottleneck adapters (seq_bn, double_seq_bn, par_bn, Compacter) and their per-row batched application.

A location hands us h (the sublayer output), x (the residual input) and the model's LayerNorm (or None
for pre-LN models). `apply_bottlenecks` returns the value *before* the model's own residual/LayerNorm
step ("pre-final"), so the host keeps doing that step itself and rows without adapters stay untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import get_activation

from .phm import PHMLayer


def activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """AdapterHub's activation names, resolved through transformers' registry."""
    if name is None:
        return nn.Identity()
    key = name.lower()
    if key == "leakyrelu":
        return nn.LeakyReLU()
    if key in ("linear", "identity"):
        return nn.Identity()
    return get_activation(key)


class Activation(nn.Module):
    """A named activation as a module (sits inside adapter_down like AdapterHub's)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name.lower()
        self.fn = activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class BottleneckAdapter(nn.Module):
    """One adapter at one location: adapter_down = [LN?, Linear|PHM, act], adapter_up = Linear|PHM."""

    def __init__(self, hidden: int, down: int, config: object, shared: nn.ParameterDict | None = None):
        super().__init__()
        if not isinstance(config.scaling, (int, float)) or isinstance(config.scaling, bool):
            raise ValueError(f"scaling={config.scaling!r} is not supported; use a number")
        self.config = config
        self.down_size = max(1, down)
        self.scaling = float(config.scaling)
        self.is_parallel = bool(config.is_parallel)
        layers: list[nn.Module] = []
        if config.ln_before:
            self.adapter_norm_before = nn.LayerNorm(hidden)
            layers.append(self.adapter_norm_before)
        if config.phm_layer:
            layers.append(PHMLayer(hidden, self.down_size, config, shared))
            self.adapter_up = PHMLayer(self.down_size, hidden, config, shared)
        else:
            layers.append(nn.Linear(hidden, self.down_size))
            self.adapter_up = nn.Linear(self.down_size, hidden)
        layers.append(Activation(config.non_linearity))
        self.adapter_down = nn.Sequential(*layers)
        if config.ln_after:
            self.adapter_norm_after = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(config.dropout)
        self._init_weights(config.init_weights)
        # Routing asks these per adapter, per location, per forward: compute them once (config is frozen).
        self._signature = (
            self.is_parallel, config.original_ln_before, config.residual_before_ln,
            config.adapter_residual_before_ln, config.non_linearity.lower(), self.down_size, self.scaling,
        )
        self._plain = not (config.ln_before or config.ln_after)
        self._delta_shape = (
            not config.adapter_residual_before_ln and config.original_ln_after
            and (self.is_parallel or config.residual_before_ln is True)
        )

    @property
    def down_proj(self) -> nn.Module:
        return self.adapter_down[1 if self.config.ln_before else 0]

    def _init_weights(self, scheme: str) -> None:
        linears = [m for m in (self.down_proj, self.adapter_up) if isinstance(m, nn.Linear)]
        with torch.no_grad():
            if scheme == "bert":
                for m in linears:
                    m.weight.normal_(0.0, 0.02)
                    m.bias.zero_()
            elif scheme == "mam_adapter":
                if isinstance(self.down_proj, nn.Linear):
                    nn.init.kaiming_uniform_(self.down_proj.weight, a=5**0.5)
                    self.down_proj.bias.zero_()
                if isinstance(self.adapter_up, nn.Linear):
                    self.adapter_up.weight.zero_()
                    self.adapter_up.bias.zero_()
            elif scheme == "houlsby":
                for m in linears:
                    nn.init.trunc_normal_(m.weight, 0.0, 1e-2, -2e-2, 2e-2)
                    m.bias.zero_()
            else:
                raise ValueError(f"unknown init_weights {scheme!r}")

    # AdapterHub's three stages, kept separate so stacks compose exactly like theirs.
    def pre_forward(
        self, hidden: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapter input, adapter residual)."""
        if self.is_parallel:
            return x, x
        cfg = self.config
        residual = hidden if cfg.residual_before_ln is True else None
        if cfg.original_ln_before:
            hidden = hidden + x
            if cfg.residual_before_ln == "post_add":
                residual = hidden
            if layer_norm is not None:
                hidden = layer_norm(hidden)
        if not cfg.residual_before_ln:
            residual = hidden
        return hidden, residual

    def forward(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        up = self.adapter_up(self.adapter_down(z)) * self.scaling
        return self.finish(up, residual)

    def finish(self, up: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = self.dropout(up)
        if self.is_parallel:
            return self.adapter_norm_after(out) if self.config.ln_after else out
        if self.config.adapter_residual_before_ln:
            out = out + residual
        if self.config.ln_after:
            out = self.adapter_norm_after(out)
        if not self.config.adapter_residual_before_ln:
            out = out + residual
        return out

    def pre_final(self, hidden: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
        """The value the host's residual/LN step receives (parallel adapters add the sublayer output)."""
        return hidden + h_in if self.is_parallel else hidden

    def signature(self) -> tuple:
        """Adapters with equal signatures run together in one gathered batched matmul."""
        return self._signature

    @property
    def delta_form(self) -> bool:
        """True when the host's output is just (its own value) + up(input): the common configurations.

        Then we add `up` to the sum the host computes anyway (h + x before BERT's LayerNorm, h in
        pre-LN blocks) instead of rebuilding it; equal to AdapterHub's order up to float rounding.
        """
        return self._delta_shape and self.batchable

    def delta_input(self, h: torch.Tensor, x: torch.Tensor, hx: torch.Tensor | None,
                    layer_norm: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """What the adapter reads in delta form; `hx` is h + x when the host already has it."""
        if self.is_parallel:
            return x
        if not self.config.original_ln_before:
            return h
        z = hx if hx is not None else h + x
        return layer_norm(z) if layer_norm is not None else z

    @property
    def batchable(self) -> bool:
        return self._plain and not (self.training and self.dropout.p > 0)

    def linear_params(self) -> tuple[tuple[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]:
        down = self.down_proj
        up = self.adapter_up
        if type(down) is nn.Linear and type(up) is nn.Linear:
            return (down.weight, down.bias), (up.weight, up.bias)
        return _linear_params(down), _linear_params(up)


def _linear_params(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(m, PHMLayer):
        return m.linear_params()
    return m.weight, m.bias


@dataclass(frozen=True)
class BottleneckResult:
    """Pre-final values for `rows` (None = all rows), and whether the host still applies its LN/residual."""

    value: torch.Tensor | LowRankUpdate  # a LowRankUpdate only for delta results at inference
    rows: torch.Tensor | slice | None  # an index tensor, a contiguous run, or None for all rows
    original_ln_after: bool
    delta: bool = False  # value is an update to add onto the host's own sum (see delta_form)


class StackCache:
    """Stacked weights of a group of adapters, reused across forward passes while no weight changed.

    Only used when no gradient is recorded; the key holds the parameters' identities and the stamp
    their storage and in-place version counters, so a reload or an optimizer step invalidates it.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple, tuple[torch.Tensor, torch.Tensor | None]]] = {}

    def get(self, params: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def stack_params(params: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    # stacked already transposed: a contiguous [S, in, out] right operand is the fast bmm layout
    w_t = torch.stack([p[0].t() for p in params])
    biases = [p[1] for p in params]
    ref = next((b for b in biases if b is not None), None)
    if ref is None:
        return w_t, None
    # slots may mix biased and bias-free layers (phm_bias=False): the latter add zero
    return w_t, torch.stack([torch.zeros_like(ref) if b is None else b for b in biases])


def _gathered_linear(
    x: torch.Tensor, params: Sequence[tuple[torch.Tensor, torch.Tensor | None]], row_slot: torch.Tensor | None,
    scale: float = 1.0, cache: StackCache | None = None,
) -> torch.Tensor:
    """Row r of x times the weight of slot row_slot[r] (times `scale`), for all rows in one (b)addbmm.

    row_slot None: row r uses slot r (one row per adapter, in order), so no gather is needed.
    """
    cached = cache is not None and not torch.is_grad_enabled()
    w_t, b = cache.get(params) if cached else stack_params(params)
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
        slot = None if len(members) == 1 else torch.tensor(slots, device=h.device)
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


# Up to this many contiguous runs of rows per group of same-shaped adapters, inference updates each run
# through slices; beyond it (many adapters with a row or two each) one gathered bmm costs less than the
# per-run op overhead. A judgement between two measured ends on MiniLM: 6 LoRAs over 19 of 32 rows (slices
# about 6x cheaper per site) and 32 seq_bn adapters with one row each (gathered about 12% faster per pass).
SEGMENT_MAX_RUNS = 8


M = TypeVar("M")


def segment_runs(members: Sequence[tuple[M, Sequence[int]]], n_rows: int) -> list[tuple[M, list[slice | None]]] | None:
    """Each member's rows as contiguous runs, or None when they add up to more than SEGMENT_MAX_RUNS runs
    (then the gathered path is cheaper)."""
    runs = [(member, row_slices(rows, n_rows)) for member, rows in members]
    return runs if sum(len(slices) for _, slices in runs) <= SEGMENT_MAX_RUNS else None


def _all_in_order(rows: Sequence[int], n_rows: int) -> bool:
    return len(rows) == n_rows and all(r == i for i, r in enumerate(rows))


def row_slices(rows: Sequence[int], n_rows: int) -> list[slice | None]:
    """`rows` as contiguous runs (slices), or [None] when they are all rows in order."""
    if _all_in_order(rows, n_rows):
        return [None]
    runs: list[slice | None] = []
    start = prev = rows[0]
    for r in rows[1:]:
        if r != prev + 1:
            runs.append(slice(start, prev + 1))
            start = r
        prev = r
    runs.append(slice(start, prev + 1))
    return runs


def row_index(rows: Sequence[int], n_rows: int, device: torch.device) -> torch.Tensor | None:
    """Index tensor of `rows`, or None when they are simply all rows in order (no gather needed)."""
    if _all_in_order(rows, n_rows):
        return None
    return torch.tensor(list(rows), device=device)


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


__all__ = ["BottleneckAdapter", "apply_bottlenecks", "merge_rows", "BottleneckResult", "activation", "F"]
