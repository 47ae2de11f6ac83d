"""Turns an ArchSpec into forward hooks on an unmodified Hugging Face model (no copied forwards).

Each hook reads the thread's ForwardContext; with no active setup it returns at once, so the bare
backbone runs exactly as before. Adapter parameters hang where AdapterHub keeps them, so state-dict
keys match their files: `<layer>.output.adapters.<name>`, `<proj>.loras.<name>`,
`prefix_tuning.prefix_tunings.<name>.self_prefix`, `shared_parameters.<name>`.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import Conv1D

from ..methods.bottleneck import BottleneckResult, StackCache, add_rows, apply_bottlenecks, merge_rows
from ..methods.composition_tree import BottleneckTree, lora_tree
from ..methods.lora import apply_loras, combine_rows
from ..methods.prefix_tuning import gather_all_layers, gather_prefixes, make_prefix_attention
from ..routing import ForwardContext
from .base import ArchSpec, BottleneckSite, LoRASite, get_path


class _Holder(nn.Module):
    """An empty module that only carries children (e.g. GPT-2's `attention_adapters`)."""


def _child(parent: nn.Module, name: str, factory: Callable[[], nn.Module]) -> nn.Module:
    if name not in parent._modules:
        parent.add_module(name, factory())
    return parent._modules[name]


@dataclass
class BottleneckLocation:
    layer: int
    site: BottleneckSite
    adapters: nn.ModuleDict
    layer_norm: nn.Module | None
    fusions: nn.ModuleDict
    stack_cache: StackCache = field(default_factory=StackCache)

    def ln_fn(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.layer_norm.forward if self.layer_norm is not None else None  # no hook re-entry


@dataclass
class LoRATarget:
    layer: int
    site: LoRASite
    module: nn.Module
    loras: nn.ModuleDict
    out_index: dict[str, torch.Tensor | None] = field(default_factory=dict)
    cover: dict[str, tuple[int, ...] | None] = field(default_factory=dict)  # out_index as a hashable key
    merged: str | None = None
    stack_cache: StackCache = field(default_factory=StackCache)
    saved: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def fan_in_fan_out(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0] if self.fan_in_fan_out else self.module.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1] if self.fan_in_fan_out else self.module.weight.shape[0]


class Wiring:
    """The adapter sites of one base model and the hooks that route rows through them."""

    def __init__(self, base: nn.Module, spec: ArchSpec):
        self.spec = spec
        self.config = base.config
        self.layers = list(get_path(base, spec.layers))
        self.n_layers = len(self.layers)
        self.bottlenecks: dict[tuple[int, str], BottleneckLocation] = {}
        self.lora_targets: list[LoRATarget] = []
        holder = _child(base, "prefix_tuning", _Holder)
        self.prefix_tunings: nn.ModuleDict = _child(holder, "prefix_tunings", nn.ModuleDict)
        self.shared_parameters: nn.ModuleDict = _child(base, "shared_parameters", nn.ModuleDict)
        self.prefix_layer_index: dict[str, dict[int, int]] = {}
        self.fusion_configs: dict[str, Any] = {}
        self.fusion_members: dict[str, tuple[str, ...]] = {}  # fusion name -> the adapters it fuses
        self._local = threading.local()
        for i, layer in enumerate(self.layers):
            for site in spec.bottleneck_sites:
                self._wire_bottleneck(i, layer, site)
            for site in spec.lora_sites:
                self._wire_lora(i, layer, site)
            attention = get_path(layer, spec.attention)
            attention._adapterserve_layer = i
            attention._adapterserve_wiring = self
        _install_attention()

    # -- bottleneck --------------------------------------------------------------------------------
    def _wire_bottleneck(self, i: int, layer: nn.Module, site: BottleneckSite) -> None:
        sublayer = get_path(layer, site.sublayer)
        container = _child(layer, site.container, _Holder) if site.container != site.sublayer else sublayer
        adapters = _child(container, "adapters", nn.ModuleDict)
        fusions = _child(container, "adapter_fusion_layer", nn.ModuleDict)
        ln = get_path(sublayer, site.layer_norm) if site.post_ln else None
        loc = BottleneckLocation(i, site, adapters, ln, fusions)
        self.bottlenecks[(i, site.location)] = loc
        if site.post_ln:
            def residual(args: tuple, kwargs: dict) -> Any:
                n = site.residual_arg
                return args[n] if len(args) > n else kwargs.get(site.residual_kwarg)

            sublayer.register_forward_pre_hook(self._capture(loc, "x", residual), with_kwargs=True)
            get_path(sublayer, site.h_module).register_forward_hook(
                self._capture(loc, "h", lambda args, output: output)
            )
            ln.register_forward_pre_hook(self._post_ln_pre_hook(loc))
            ln.register_forward_hook(self._post_ln_override(loc))
        else:
            get_path(layer, site.residual_ln).register_forward_pre_hook(
                self._capture(loc, "x", lambda args: args[0])
            )
            sublayer.register_forward_hook(self._pre_ln_hook(loc))

    def _capture(self, loc: BottleneckLocation, slot: str, pick: Callable[..., Any]) -> Callable:
        """A hook that keeps one input of this location (h or x) for the hook that applies the adapters."""
        key = (loc.layer, loc.site.location)

        def hook(module: nn.Module, *hook_args: Any) -> None:
            ctx = self._has_work(loc)
            if ctx is not None:
                ctx.stash[(key, slot)] = pick(*hook_args)
        return hook

    def _routed(self, loc: BottleneckLocation, h: torch.Tensor, x: torch.Tensor,
                hx: torch.Tensor | None = None) -> list[BottleneckResult] | None:
        """The bottleneck results for this location under the current context (None: nothing to do)."""
        ctx = ForwardContext.current()
        if ctx is None or ctx.plan is None or not len(loc.adapters):
            return None
        if ctx.tree is not None:
            tree = BottleneckTree(loc.adapters, loc.fusions, loc.ln_fn(), self.fusion_configs)
            n = h.shape[0]
            return [
                BottleneckResult(value, None if len(idx) == n else idx, last.config.original_ln_after)
                for idx, value, last in tree.run(ctx.tree, h, x)
            ] or None
        groups = ctx.plan.groups(frozenset(loc.adapters.keys()))
        if not groups:
            return None
        return apply_bottlenecks(loc.adapters, groups, h, x, loc.ln_fn(), hx, loc.stack_cache)

    def _has_work(self, loc: BottleneckLocation) -> ForwardContext | None:
        ctx = ForwardContext.current()
        if ctx is None or ctx.plan is None or not len(loc.adapters):
            return None
        return ctx

    def _post_ln_pre_hook(self, loc: BottleneckLocation) -> Callable:
        key = (loc.layer, loc.site.location)

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            ctx = self._has_work(loc)
            if ctx is None:
                return None
            h, x = ctx.stash.pop((key, "h")), ctx.stash.pop((key, "x"))
            results = self._routed(loc, h, x, hx=args[0])
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

    def _post_ln_override(self, loc: BottleneckLocation) -> Callable:
        key = (loc.layer, loc.site.location)

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            ctx = ForwardContext.current()
            if ctx is None:
                return None
            skip: list[BottleneckResult] | None = ctx.stash.pop((key, "override"), None)
            if not skip:
                return None
            return merge_rows(output, skip, lambda r: r.value)
        return hook

    def _pre_ln_hook(self, loc: BottleneckLocation) -> Callable:
        key = (loc.layer, loc.site.location)

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            ctx = self._has_work(loc)
            if ctx is None:
                return None
            x = ctx.stash.pop((key, "x"))
            h = output[0] if isinstance(output, tuple) else output
            results = self._routed(loc, h, x)
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

    # -- LoRA / IA3 --------------------------------------------------------------------------------
    def _wire_lora(self, i: int, layer: nn.Module, site: LoRASite) -> None:
        module = get_path(layer, site.module)
        loras = _child(module, "loras", nn.ModuleDict)
        target = LoRATarget(i, site, module, loras)
        self.lora_targets.append(target)
        module.register_forward_hook(self._lora_hook(target))

    def _lora_hook(self, target: LoRATarget) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            ctx = ForwardContext.current()
            if ctx is None or ctx.plan is None or not len(target.loras):
                return None
            if ctx.tree is not None:
                return self._lora_tree(target, ctx.tree, args[0], output)
            groups = ctx.plan.groups(frozenset(target.loras.keys()))
            if not groups:
                return None
            if target.merged is not None:
                others = {n for stack, _ in groups for n in stack} - {target.merged}
                if others:
                    raise ValueError(
                        f"LoRA {target.merged!r} is merged into {target.site.module} of layer {target.layer}; "
                        f"unmerge it before running {sorted(others)}"
                    )
            if len(target.site.attn_keys) <= 1:
                return apply_loras(target.loras, groups, args[0], output, None, skip=target.merged, cache=target.stack_cache)
            return self._fused_lora(target, groups, args[0], output)
        return hook

    def _fused_lora(self, target: LoRATarget, groups: tuple, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """A fused q/k/v layer: rows are grouped by which thirds their adapter covers."""
        by_cover: dict[tuple[int, ...] | None, tuple[torch.Tensor | None, list]] = {}
        for stack, rows in groups:
            live = tuple(n for n in stack if n != target.merged)
            if len(live) > 1:
                raise ValueError(
                    f"Stack{live!r}: stacking LoRA/IA3 adapters on the fused projection {target.site.module} "
                    "is not supported (AdapterHub refuses it as well)"
                )
            if live:
                idx = target.out_index.get(live[0])
                by_cover.setdefault(target.cover.get(live[0]), (idx, []))[1].append((stack, rows))
        result = output
        for out_index, sub in by_cover.values():
            result = apply_loras(target.loras, tuple(sub), x, result, out_index, skip=target.merged,
                                 cache=target.stack_cache)
        return result

    def _lora_tree(self, target: LoRATarget, tree: Any, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        if target.merged is not None:
            raise ValueError(f"LoRA {target.merged!r} is merged; unmerge it before running {tree!r}")
        names = {id(m): n for n, m in target.loras.items()}

        def combine(out: torch.Tensor, hidden: torch.Tensor, last: nn.Module) -> torch.Tensor:
            return combine_rows(out, None, hidden, last.kind, target.out_index.get(names[id(last)]))

        return lora_tree(target.loras, tree, x, output, combine)

    # -- prefix tuning -----------------------------------------------------------------------------
    def prefix_for(self, module: nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        ctx = ForwardContext.current()
        if ctx is None or ctx.plan is None or not len(self.prefix_tunings):
            return None
        layer = module._adapterserve_layer
        cache = ctx.prefix_states
        if layer in cache:
            return cache[layer]
        present = frozenset(self.prefix_tunings.keys())
        rows = [tuple(n for n in stack if n in present) for stack in ctx.plan.rows]
        if not any(rows):
            cache[layer] = None
            return None
        if len(rows) != batch:
            raise ValueError(f"prefix routing expected {len(rows)} rows, attention got {batch}")
        fast = self._prefix_all_layers(ctx, rows)
        if fast is not None:
            kv, keep = fast
            found = (kv[:, layer, 0], kv[:, layer, 1], keep)
            cache[layer] = found
            return found
        kvs = {n: self.prefix_tunings[n]["self_prefix"].key_values() for n in {n for r in rows for n in r}}
        per_row = []
        for stack in rows:
            entries = []
            for n in stack:
                idx = self.prefix_layer_index[n].get(layer)
                if idx is not None:
                    entries.append(kvs[n][idx])
            per_row.append(entries)
        ref = next(iter(self.prefix_tunings.parameters()))
        found = gather_prefixes(per_row, ref.device, ref.dtype)
        cache[layer] = found
        return found


    def _prefix_all_layers(self, ctx: ForwardContext, rows: list[tuple[str, ...]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The one-gather path when each row has at most one prefix that covers every layer."""
        if "_all" in ctx.prefix_states:
            return ctx.prefix_states["_all"]
        names = sorted({n for r in rows for n in r})
        full = all(len(self.prefix_layer_index[n]) == self.n_layers for n in names)
        if not full or any(len(r) > 1 for r in rows):
            ctx.prefix_states["_all"] = None
            return None
        modules = [self.prefix_tunings[n]["self_prefix"] for n in names]
        slot = [names.index(r[0]) if r else -1 for r in rows]
        ref = next(iter(self.prefix_tunings.parameters()))
        result = gather_all_layers(modules, slot, ref.device, ref.dtype)
        ctx.prefix_states["_all"] = result
        return result


_INSTALLED = threading.Lock()
_DONE: list[bool] = []


def _lookup(module: nn.Module, batch: int) -> Any:
    wiring: Wiring | None = getattr(module, "_adapterserve_wiring", None)
    return wiring.prefix_for(module, batch) if wiring is not None else None


def _eager_delegate(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)


def _install_attention() -> None:
    """Register prefix-aware "sdpa" and "eager" attention once, delegating to the originals."""
    with _INSTALLED:
        if _DONE:
            return
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ALL_ATTENTION_FUNCTIONS.register("sdpa", make_prefix_attention(sdpa, _lookup, as_bool=True, cpu_kv_multiple=16))
        ALL_ATTENTION_FUNCTIONS.register("eager", make_prefix_attention(_eager_delegate, _lookup, as_bool=False))
        _DONE.append(True)
