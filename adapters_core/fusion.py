"""AdapterFusion management on a model: add, delete, train, save and load fusion layers.

A fusion layer named like AdapterHub's (",".join of the fused adapters, or Fuse(name=...)) sits at
every bottleneck location where all fused adapters are present, under `adapter_fusion_layer.<name>`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .composition import Fuse, parse_composition
from .configuration import AdapterFusionConfig
from .formats import (
    FORMAT_VERSION,
    FUSION_CONFIG,
    FUSION_WEIGHTS,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)
from .methods.fusion import FusionLayer


def _as_fuse(fusion: Fuse | list[str] | tuple[str, ...] | str) -> Fuse:
    if isinstance(fusion, Fuse):
        return fusion
    if isinstance(fusion, str):
        fusion = fusion.split(",")
    return Fuse(*fusion)


class FusionMixin:
    """Methods for AdapterFusion; mixed into AdapterModelMixin."""

    def _fusion_locations(self, fuse: Fuse) -> list[Any]:
        names = fuse.flatten()
        return [loc for loc in self._wiring.bottlenecks.values() if all(n in loc.adapters for n in names)]

    def add_adapter_fusion(
        self, fusion: Fuse | list[str] | str, config: AdapterFusionConfig | dict | str | None = None,
        overwrite_ok: bool = False, set_active: bool = False,
    ) -> None:
        fuse = _as_fuse(fusion)
        for name in fuse.flatten():
            if not self.has_adapter(name):
                raise ValueError(f"{fuse!r}: no adapter named {name!r}")
            if self.adapter_methods()[name] != frozenset({"bottleneck"}):
                raise ValueError(f"{fuse!r}: {name!r} is not a bottleneck adapter; only those can be fused")
        cfg = AdapterFusionConfig.load(config if config is not None else "dynamic")
        wiring = self._wiring
        if fuse.name in wiring.fusion_configs:
            if not overwrite_ok:
                raise ValueError(f"an adapter fusion named {fuse.name!r} already exists")
            self.delete_adapter_fusion(fuse)
        locations = self._fusion_locations(fuse)
        if not locations:
            raise ValueError(f"{fuse!r}: the fused adapters share no location")
        ref = next(self.adapter_base.parameters())
        dropout = float(getattr(self.adapter_base.config, "attention_probs_dropout_prob", 0.0) or 0.0)
        for loc in locations:
            layer = FusionLayer(cfg, self._hidden(), dropout).to(device=ref.device, dtype=ref.dtype)
            loc.fusions[fuse.name] = layer
        wiring.fusion_configs[fuse.name] = cfg
        wiring.fusion_members[fuse.name] = tuple(fuse.flatten())
        self.train(self.training)
        if set_active:
            self.set_active_adapters(fuse)

    def delete_adapter_fusion(self, fusion: Fuse | list[str] | str) -> None:
        fuse = _as_fuse(fusion)
        wiring = self._wiring
        if fuse.name not in wiring.fusion_configs:
            raise ValueError(f"no adapter fusion named {fuse.name!r}")
        for loc in wiring.bottlenecks.values():
            if fuse.name in loc.fusions:
                del loc.fusions[fuse.name]
        del wiring.fusion_configs[fuse.name]
        wiring.fusion_members.pop(fuse.name, None)

    def fusion_named_parameters(self, fusion: Fuse | list[str] | str) -> list[tuple[str, nn.Parameter]]:
        name = _as_fuse(fusion).name
        mark = f".adapter_fusion_layer.{name}."
        prefix = self._key_prefix()
        return [(prefix + k, p) for k, p in self.adapter_base.named_parameters() if mark in "." + k]

    def train_adapter_fusion(self, fusion: Fuse | list[str] | str, unfreeze_adapters: bool = False) -> None:
        """Train only the fusion layers (and optionally the fused adapters); the backbone stays frozen."""
        fuse = _as_fuse(fusion)
        if fuse.name not in self._wiring.fusion_configs:
            raise ValueError(f"no adapter fusion named {fuse.name!r}")
        for p in self.parameters():
            p.requires_grad_(False)
        for _, p in self.fusion_named_parameters(fuse):
            p.requires_grad_(True)
        if unfreeze_adapters:
            for name in fuse.flatten():
                for p in self.adapter_parameters(name):
                    p.requires_grad_(True)
        self.set_active_adapters(parse_composition(fuse))
        self.train()

    def save_adapter_fusion(self, save_directory: str | os.PathLike[str], fusion: Fuse | list[str] | str) -> None:
        fuse = _as_fuse(fusion)
        cfg = self._wiring.fusion_configs.get(fuse.name)
        if cfg is None:
            raise ValueError(f"no adapter fusion named {fuse.name!r}")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        conf = self.adapter_base.config
        write_json(folder / FUSION_CONFIG, {
            "config": cfg.to_dict(), "adapter_names": list(fuse.flatten()), "name": fuse.name,
            "hidden_size": int(conf.hidden_size), "model_type": conf.model_type,
            "model_class": self.adapters_registry.spec.adapter_model_class, "version": FORMAT_VERSION,
        })
        write_safetensors(folder / FUSION_WEIGHTS, {k: p.detach() for k, p in self.fusion_named_parameters(fuse)})

    def load_adapter_fusion(self, directory: str | os.PathLike[str], set_active: bool = False) -> Fuse:
        folder = Path(directory)
        meta = read_json(folder / FUSION_CONFIG)
        names = meta.get("adapter_names") or str(meta.get("name", "")).split(",")
        fuse = Fuse(*names, name=meta.get("name") or None)
        state = read_safetensors(folder / FUSION_WEIGHTS)
        if not state:
            raise ValueError(f"{FUSION_WEIGHTS} is missing or empty in {folder}")
        self.add_adapter_fusion(fuse, AdapterFusionConfig.from_dict(meta["config"]), overwrite_ok=True)
        params = dict(self.fusion_named_parameters(fuse))
        wrong = sorted(set(state) ^ set(params))
        if wrong:
            self.delete_adapter_fusion(fuse)
            raise ValueError(f"fusion keys do not match this model: {', '.join(wrong[:5])}")
        with torch.no_grad():
            for key, value in state.items():
                if value.shape != params[key].shape:
                    self.delete_adapter_fusion(fuse)
                    raise ValueError(f"wrong shape for {key}: {tuple(value.shape)} vs {tuple(params[key].shape)}")
                params[key].copy_(value)
        if set_active:
            self.set_active_adapters(fuse)
        return fuse
