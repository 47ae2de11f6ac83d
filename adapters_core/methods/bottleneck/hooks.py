"""Where bottlenecks attach: one `BottleneckLocation` per (layer, declared site), and the forward hooks there.

post-LN sites (BERT) capture h (the dropout output) and x (the residual input) and rewrite the
LayerNorm's input (and, for adapters that skip the model's LN, its output); pre-LN sites (GPT-2, Llama)
capture x at the residual LayerNorm and rewrite the sublayer's output. Each hook reads the thread's
ForwardContext; with no active setup it returns at once, so the bare backbone runs exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...routing import ForwardContext, TreeRows
from ..base import child_module, container, get_path
from ..stack_cache import StackCache
from .apply import BottleneckResult, add_rows, apply_bottlenecks, merge_rows
from .site import BottleneckSite
from .tree import BottleneckTree


@dataclass
class BottleneckLocation:
    """One site in one layer: its adapters (`adapters.<name>`) and AdapterFusion layers (`adapter_fusion_layer`)."""

    layer: int
    site: BottleneckSite
    adapters: nn.ModuleDict
    layer_norm: nn.Module | None
    fusions: nn.ModuleDict
    stack_cache: StackCache

    @property
    def key(self) -> tuple[int, str]:
        return (self.layer, self.site.location)

    def ln_fn(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.layer_norm.forward if self.layer_norm is not None else None  # no hook re-entry


def wire_location(i: int, layer: nn.Module, site: BottleneckSite, stack_cache: StackCache) -> BottleneckLocation:
    """Create the containers of one site in layer `i` and install its hooks (`stack_cache`: the model's)."""
    sublayer = get_path(layer, site.sublayer)
    holder = container(layer, site.container) if site.container != site.sublayer else sublayer
    adapters = child_module(holder, "adapters", nn.ModuleDict)
    fusions = child_module(holder, "adapter_fusion_layer", nn.ModuleDict)
    ln = None
    if site.post_ln:
        ln = get_path(layer, site.layer_ln) if site.layer_ln else get_path(sublayer, site.layer_norm)
    loc = BottleneckLocation(i, site, adapters, ln, fusions, stack_cache)
    if site.post_ln:
        def residual(args: tuple, kwargs: dict) -> Any:
            n = site.residual_arg
            return args[n] if len(args) > n else kwargs.get(site.residual_kwarg)

        sublayer.register_forward_pre_hook(_capture(loc, "x", residual), with_kwargs=True)
        if site.h_module:
            get_path(sublayer, site.h_module).register_forward_hook(_capture(loc, "h", lambda args, output: output))
        ln.register_forward_pre_hook(_post_ln_pre_hook(loc))
        ln.register_forward_hook(_post_ln_override(loc))
    else:
        get_path(layer, site.residual_ln).register_forward_pre_hook(_capture(loc, "x", lambda args: args[0]))
        sublayer.register_forward_hook(_pre_ln_hook(loc))
    return loc


def _has_work(loc: BottleneckLocation) -> ForwardContext | None:
    ctx = ForwardContext.current()
    if ctx is None or ctx.plan is None or not len(loc.adapters):
        return None
    return ctx


def _capture(loc: BottleneckLocation, slot: str, pick: Callable[..., Any]) -> Callable:
    """A hook that keeps one input of this location (h or x) for the hook that applies the adapters."""
    key = loc.key

    def hook(module: nn.Module, *hook_args: Any) -> None:
        ctx = _has_work(loc)
        if ctx is not None:
            ctx.stash[(key, slot)] = pick(*hook_args)
    return hook


def _routed(loc: BottleneckLocation, h: torch.Tensor, x: torch.Tensor,
            hx: torch.Tensor | None = None) -> list[BottleneckResult] | None:
    """The bottleneck results for this location under the current context (None: nothing to do).

    Flat rows share the batched kernels; each tree part of the plan is interpreted on its own rows.
    """
    ctx = ForwardContext.current()
    if ctx is None or ctx.plan is None or not len(loc.adapters):
        return None
    plan = ctx.plan
    groups = plan.groups(frozenset(loc.adapters.keys()))
    results = apply_bottlenecks(loc.adapters, groups, h, x, loc.ln_fn(), hx, loc.stack_cache) if groups else []
    for part in plan.trees:
        results.extend(_tree_results(loc, part, h, x))
    return results or None


def _tree_results(loc: BottleneckLocation, part: TreeRows, h: torch.Tensor, x: torch.Tensor) -> list[BottleneckResult]:
    """The tree interpreter's results for one tree part, with row indices into the whole batch."""
    tree = BottleneckTree(loc.adapters, loc.fusions, loc.ln_fn())
    n = h.shape[0]
    whole = part.start == 0 and part.stop == n
    hs, xs = (h, x) if whole else (h[part.rows], x[part.rows])
    return [
        BottleneckResult(value, None if len(idx) == n else idx + part.start, last.config.original_ln_after)
        for idx, value, last in tree.run(part.block, hs, xs)
    ]


def _post_ln_pre_hook(loc: BottleneckLocation) -> Callable:
    key = loc.key

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        ctx = _has_work(loc)
        if ctx is None:
            return None
        x = ctx.stash.pop((key, "x"))
        h = ctx.stash.pop((key, "h")) if loc.site.h_module else args[0] - x
        results = _routed(loc, h, x, hx=args[0])
        if not results:
            return None
        keep = [r for r in results if r.original_ln_after and not r.delta]
        skip = [r for r in results if not r.original_ln_after]
        if skip:
            ctx.stash[(key, "override")] = skip
        z = args[0]
        if keep:
            xs = lambda r: x if r.rows is None else x[r.rows]  # noqa: E731
            z = merge_rows(z, keep, lambda r: r.value + xs(r))
        for r in results:
            if r.delta:
                z = add_rows(z, r.rows, r.value)
        return (z,)
    return hook


def _post_ln_override(loc: BottleneckLocation) -> Callable:
    key = loc.key

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        ctx = ForwardContext.current()
        if ctx is None:
            return None
        skip: list[BottleneckResult] | None = ctx.stash.pop((key, "override"), None)
        if not skip:
            return None
        return merge_rows(output, skip, lambda r: r.value)
    return hook


def _pre_ln_hook(loc: BottleneckLocation) -> Callable:
    key = loc.key

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        ctx = _has_work(loc)
        if ctx is None:
            return None
        x = ctx.stash.pop((key, "x"))
        h = output[0] if isinstance(output, tuple) else output
        results = _routed(loc, h, x)
        if not results:
            return None

        def value(r: BottleneckResult) -> torch.Tensor:
            if r.original_ln_after:
                return r.value
            return r.value - (x if r.rows is None else x[r.rows])

        full = [r for r in results if not r.delta]
        new_h = merge_rows(h, full, value) if full else h
        for r in results:
            if r.delta:
                new_h = add_rows(new_h, r.rows, r.value)
        return (new_h, *output[1:]) if isinstance(output, tuple) else new_h
    return hook
