"""Where LoRA and (IA)^3 attach: one `LoRATarget` per declared linear layer, its forward hook and placement.

A fused projection (GPT-2's c_attn computes q, k and v) is split in equal thirds: an adapter covers the
thirds its `attn_matrices` enable, recorded in `cover` (None: every output) and indexed by `out_index` on
the layer's device. The hook adds each routed row's update to the layer's output; rows sharing a kind and
shape share one batched kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...routing import ForwardContext, TreeRows, host_to_device
from ..base import Host, child_module, get_path
from ..stack_cache import StackCache
from .apply import apply_loras, combine_rows
from .config import LoRAConfig
from .layer import LinearAdapter
from .site import LoRASite
from .tree import lora_tree

#: The key of the LoRA room's state in `Host.rooms`.
ROOM = "lora"

#: Builds the module of one adapter on one target: (config, in_features, enabled outputs, groups) -> module.
ModuleFactory = Callable[[LoRAConfig, int, int, int], LinearAdapter]


@dataclass
class LoRATarget:
    """One declared linear layer in one layer: its adapters (`loras.<name>`) and which outputs each covers."""

    layer: int
    site: LoRASite
    module: nn.Module
    loras: nn.ModuleDict
    stack_cache: StackCache
    cover: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    placed: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = field(default_factory=dict)  # model-wide
    merged: str | None = None
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

    @property
    def fused(self) -> bool:
        return len(self.site.attn_keys) > 1

    def out_index(self, name: str, device: torch.device) -> torch.Tensor | None:
        """The output columns adapter `name` covers as an index on `device` (None: all); built once per device
        and shared by the model's targets."""
        cover = self.cover.get(name)
        if cover is None:
            return None
        key = (cover, device)
        idx = self.placed.get(key)
        if idx is None:
            idx = self.placed[key] = host_to_device(cover, device)
        return idx


@dataclass
class LoRAState:
    """A model's LoRA/IA3 targets, in layer order."""

    targets: list[LoRATarget] = field(default_factory=list)
    placed: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = field(default_factory=dict)


def lora_targets(host: Host) -> list[LoRATarget]:
    """The linear-layer targets on `host` (the LoRA room creates them; IA3 and PEFT reading use them too)."""
    return host.rooms[ROOM].targets


def wire_targets(host: Host) -> LoRAState:
    state = LoRAState()
    for i, layer, site in host.sites(LoRASite):
        module = get_path(layer, site.module)
        target = LoRATarget(i, site, module, child_module(module, "loras", nn.ModuleDict), host.stack_cache,
                            placed=state.placed)
        module.register_forward_hook(_hook(target))
        state.targets.append(target)
    return state


def place_linear_adapters(host: Host, name: str, config: LoRAConfig, factory: ModuleFactory) -> None:
    """Put adapter `name` on every target `config` enables (leave_out excluded); a fused target gets the
    enabled thirds only."""
    added = 0
    for target in lora_targets(host):
        if target.layer in config.leave_out:
            continue
        site = target.site
        if site.location == "selfattn":
            if not config.selfattn_lora:
                continue
            enabled = [k in config.attn_matrices for k in site.attn_keys]
            if not any(enabled):
                continue
        elif not getattr(config, f"{site.location}_lora"):
            continue
        else:
            enabled = [True]
        out_all = target.out_features
        if target.fused:
            third = out_all // len(site.attn_keys)
            idx = [j for j, on in enumerate(enabled) for j in range(j * third, (j + 1) * third) if on]
            out_enabled = len(idx)
            target.cover[name] = None if all(enabled) else tuple(idx)
        else:
            out_enabled = out_all
            target.cover[name] = None
        groups = sum(enabled) if target.fused else 1
        key = ("linear", id(target), factory, target.in_features, out_enabled, groups, config)
        target.loras[name] = host.stack_cache.spares.build(key, factory, config, target.in_features, out_enabled, groups)
        added += 1
    if not added:
        raise ValueError(f"LoRA config for {name!r} matches no layer of this model")


def unmerge_target(target: LoRATarget) -> None:
    """Restore the layer's weights saved when an adapter was merged into it (bit for bit)."""
    if target.saved is None:
        return
    w, b = target.saved
    with torch.no_grad():
        target.module.weight.copy_(w)
        if b is not None:
            target.module.bias.copy_(b)
    target.saved = None
    target.merged = None


def remove_linear_adapters(host: Host, name: str) -> None:
    """Drop adapter `name` from every target, unmerging it first where it is merged."""
    for target in lora_targets(host):
        if name in target.loras:
            if target.merged == name:
                unmerge_target(target)
            host.stack_cache.spares.keep(target.loras[name])
            del target.loras[name]
        target.cover.pop(name, None)


def _hook(target: LoRATarget) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        ctx = ForwardContext.current()
        if ctx is None or ctx.plan is None or not len(target.loras):
            return None
        plan = ctx.plan
        groups = plan.groups(frozenset(target.loras.keys()))
        if not groups and not plan.trees:
            return None
        result = output
        if groups:
            if target.merged is not None:
                others = {n for stack, _ in groups for n in stack} - {target.merged}
                if others:
                    raise ValueError(
                        f"LoRA {target.merged!r} is merged into {target.site.module} of layer {target.layer}; "
                        f"unmerge it before running {sorted(others)}"
                    )
            if target.fused:
                result = _fused(target, groups, args[0], result)
            else:
                result = apply_loras(target.loras, groups, args[0], result, None, skip=target.merged,
                                     cache=target.stack_cache)
        for part in plan.trees:
            result = _tree(target, part, args[0], result)
        return result
    return hook


def _fused(target: LoRATarget, groups: tuple, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
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
            idx = target.out_index(live[0], output.device)
            by_cover.setdefault(target.cover.get(live[0]), (idx, []))[1].append((stack, rows))
    result = output
    for out_index, sub in by_cover.values():
        result = apply_loras(target.loras, tuple(sub), x, result, out_index, skip=target.merged,
                             cache=target.stack_cache)
    return result


def _tree(target: LoRATarget, part: TreeRows, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """`output` with the tree interpreter's updates on one tree part's rows."""
    if target.merged is not None:
        raise ValueError(f"LoRA {target.merged!r} is merged; unmerge it before running {part.block!r}")
    names = {id(m): n for n, m in target.loras.items()}

    def combine(out: torch.Tensor, hidden: torch.Tensor, last: LinearAdapter) -> torch.Tensor:
        return combine_rows(out, None, hidden, last.kind, target.out_index(names[id(last)], out.device))

    if part.start == 0 and part.stop == output.shape[0]:
        got = lora_tree(target.loras, part.block, x, output, combine)
        return output if got is None else got
    got = lora_tree(target.loras, part.block, x[part.rows], output[part.rows], combine)
    if got is None:
        return output
    return torch.cat([output[:part.start], got, output[part.stop:]])
