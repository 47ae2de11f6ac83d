"""Prefix ejection and LoRA/(IA)^3 merging, mixed into AdapterModelMixin.

Merging folds an adapter into the base weights and remembers the original tensors, so unmerging
restores them bit for bit (no division); (IA)^3 scales the bias too, so merged == unmerged output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .configuration import ConfigUnion, LoRAConfig, PrefixTuningConfig
from .methods.lora import IA3
from .methods.prefix_tuning import PrefixTuningModule


class MergeMixin:
    """eject_prefix_tuning, merge_adapter, unmerge_adapter."""

    def eject_prefix_tuning(self, name: str) -> None:
        """Replace a reparameterised prefix by the flat tensor its MLP produces (fewer parameters)."""
        cfg = self.adapters_registry.configs.get(name)
        if cfg is None:
            raise ValueError(f"no adapter named {name!r}")
        wiring = self._wiring
        if name not in wiring.prefix_tunings:
            raise ValueError(f"adapter {name!r} has no prefix tuning to eject")
        old: PrefixTuningModule = wiring.prefix_tunings[name]["self_prefix"]
        if old.flat:
            return
        members = [m.replace(flat=True) if isinstance(m, PrefixTuningConfig) else m for m in cfg.methods()]
        new_cfg = members[0] if len(members) == 1 else ConfigUnion(*members)
        pcfg = next(m for m in members if isinstance(m, PrefixTuningConfig))
        with torch.no_grad():
            flat = old.flat_weights().detach().clone()
        new = PrefixTuningModule(old.n_layers, old.n_kv_heads, old.head_dim, self._hidden(), pcfg)
        new.control_trans = nn.Parameter(flat.to(device=flat.device, dtype=flat.dtype))
        new.train(self.training)
        wiring.prefix_tunings[name] = nn.ModuleDict({"self_prefix": new})
        self.adapters_registry.configs[name] = new_cfg

    def merge_adapter(self, name: str) -> None:
        """Fold a LoRA or (IA)^3 adapter into the base weights; `unmerge_adapter` restores them exactly."""
        cfg = self.adapters_registry.configs.get(name)
        if cfg is None or not any(isinstance(m, LoRAConfig) for m in cfg.methods()):
            raise ValueError(f"{name!r} is not a LoRA or (IA)^3 adapter")
        targets = [t for t in self._wiring.lora_targets if name in t.loras]
        for t in targets:
            if t.merged is not None and t.merged != name:
                raise ValueError(f"{t.merged!r} is already merged into layer {t.layer}; unmerge it first")
        for t in targets:
            if t.merged == name:
                continue
            self._merge_target(t, name)

    def _merge_target(self, target: Any, name: str) -> None:
        mod = target.loras[name]
        w = target.module.weight
        b = getattr(target.module, "bias", None)
        target.saved = (w.detach().clone(), None if b is None else b.detach().clone())
        idx = target.out_index.get(name)
        rows = torch.arange(target.out_features, device=w.device) if idx is None else idx.to(w.device)
        with torch.no_grad():
            wt = w.t() if target.fan_in_fan_out else w  # (out, in) view
            if isinstance(mod, IA3):
                vec = mod.vector().to(w.dtype)
                wt[rows] = wt[rows] * vec[:, None]
                if b is not None:
                    b[rows] = b[rows] * vec
            else:
                wt[rows] = wt[rows] + mod.delta_weight().to(w.dtype)
        target.merged = name

    def _unmerge_target(self, target: Any) -> None:
        if target.saved is None:
            return
        w, b = target.saved
        with torch.no_grad():
            target.module.weight.copy_(w)
            if b is not None:
                target.module.bias.copy_(b)
        target.saved = None
        target.merged = None

    def unmerge_adapter(self, name: str | None = None) -> None:
        for t in self._wiring.lora_targets:
            if t.merged is not None and (name is None or t.merged == name):
                self._unmerge_target(t)

    reset_adapter = unmerge_adapter
