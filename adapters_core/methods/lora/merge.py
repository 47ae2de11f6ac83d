"""LoRA/(IA)^3 merging, as model methods: fold an adapter into the base weights and restore them exactly.

Merging remembers the original tensors, so unmerging restores them bit for bit (no division); (IA)^3
scales the bias too, so merged == unmerged output. Mixed into the adapter mixin through `LoRAMethod.api`;
`self` is the model (its `_host` and `adapters_config`).
"""

from __future__ import annotations

import torch

from .config import LoRAConfig
from .targets import LoRATarget, lora_targets, unmerge_target


def merge_target(target: LoRATarget, name: str) -> None:
    """Fold adapter `name` into `target`'s layer weights, keeping the originals for unmerging."""
    mod = target.loras[name]
    w = target.module.weight
    b = getattr(target.module, "bias", None)
    target.saved = (w.detach().clone(), None if b is None else b.detach().clone())
    idx = target.out_index(name, w.device)
    rows = torch.arange(target.out_features, device=w.device) if idx is None else idx
    with torch.no_grad():
        mod.merge_into(w.t() if target.fan_in_fan_out else w, b, rows)  # the (out, in) view
    target.merged = name


class MergeAPI:
    """merge_adapter, unmerge_adapter (alias reset_adapter)."""

    def merge_adapter(self, name: str) -> None:
        """Fold a LoRA or (IA)^3 adapter into the base weights; `unmerge_adapter` restores them exactly."""
        cfg = self.adapters_config.get(name)
        if cfg is None or not any(isinstance(m, LoRAConfig) for m in cfg.methods()):
            raise ValueError(f"{name!r} is not a LoRA or (IA)^3 adapter")
        targets = [t for t in lora_targets(self._host) if name in t.loras]
        for t in targets:
            if t.merged is not None and t.merged != name:
                raise ValueError(f"{t.merged!r} is already merged into layer {t.layer}; unmerge it first")
        for t in targets:
            if t.merged != name:
                merge_target(t, name)

    def unmerge_adapter(self, name: str | None = None) -> None:
        """Restore the weights an adapter (`name`, or any) was merged into."""
        for t in lora_targets(self._host):
            if t.merged is not None and (name is None or t.merged == name):
                unmerge_target(t)

    reset_adapter = unmerge_adapter
