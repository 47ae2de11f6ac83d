"""AdapterFusion management, as model methods: add, delete, train, save, load and inspect fusion layers.

A fusion layer named like AdapterHub's (",".join of the fused adapters, or Fuse(name=...)) sits at
every bottleneck location where all fused adapters are present, under `adapter_fusion_layer.<name>`.
Mixed into the adapter mixin through `FusionMethod.api`; `self` is the model (its `_host`, adapters,
parameters and `_inspection()` copy).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...composition import Fuse, parse_composition
from ...formats import (
    FORMAT_VERSION,
    FUSION_CONFIG,
    FUSION_WEIGHTS,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)
from ..base import Host
from ..bottleneck.hooks import BottleneckLocation
from ..bottleneck.method import bottlenecks
from .config import AdapterFusionConfig
from .layer import FusionLayer

#: The key of the fusion room's state in `Host.rooms`.
ROOM = "fusion"


@dataclass
class FusionState:
    """A model's fusions: each one's config and the adapters it fuses, by fusion name."""

    configs: dict[str, AdapterFusionConfig] = field(default_factory=dict)
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)


def fusions(host: Host) -> FusionState:
    """The fusion room's state on `host`."""
    return host.rooms[ROOM]


def _as_fuse(fusion: Fuse | list[str] | tuple[str, ...] | str) -> Fuse:
    if isinstance(fusion, Fuse):
        return fusion
    if isinstance(fusion, str):
        fusion = fusion.split(",")
    return Fuse(*fusion)


@dataclass(frozen=True)
class FusionInfo:
    """What inspect_fusion_dir learned: the fused adapters' names as saved, the config, the weights' size."""

    adapter_names: tuple[str, ...]
    config: dict[str, Any]
    nbytes: int


def saved_fusion_names(meta: dict[str, Any]) -> tuple[str, ...]:
    """The adapters a saved fusion config fuses: `adapter_names`, else AdapterHub's comma-joined `name`."""
    names = meta.get("adapter_names") or str(meta.get("name", "")).split(",")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{FUSION_CONFIG}: adapter_names must be a non-empty list of adapter names")
    return tuple(names)


def _saved_fuse(meta: dict[str, Any]) -> Fuse:
    return Fuse(*saved_fusion_names(meta), name=meta.get("name") or None)


def remove_fusion(host: Host, name: str) -> None:
    """Drop fusion `name`'s layers from every location and forget it."""
    for loc in bottlenecks(host):
        if name in loc.fusions:
            del loc.fusions[name]
    state = fusions(host)
    state.configs.pop(name, None)
    state.members.pop(name, None)


def _config(meta: dict[str, Any]) -> dict[str, Any]:
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{FUSION_CONFIG} has no `config` object")
    return config


def _unprobed(message: str, probes: list[str], saved: Fuse) -> str:
    """`message` with the inspection's probe names put back to the names the fusion was saved with."""
    for probe, name in sorted(zip(probes, saved.children, strict=True), key=lambda pn: -len(pn[0])):
        message = message.replace(probe, str(name))
    return message.replace("__fusion_probe", saved.name)


class FusionAPI:
    """add_adapter_fusion, delete_adapter_fusion, train/save/load/inspect, fusion_named_parameters, fusion_nbytes."""

    def _fusion_locations(self, fuse: Fuse) -> list[BottleneckLocation]:
        """The locations where every fused adapter sits. A location holding only some of them is refused:
        it could not fuse them, and AdapterHub fails there at the first forward pass (no fusion layer)."""
        names = fuse.flatten()
        locations = []
        for loc in bottlenecks(self._host):
            present = [n for n in names if n in loc.adapters]
            if present and len(present) < len(names):
                missing = [n for n in names if n not in loc.adapters]
                raise ValueError(
                    f"{fuse!r}: the fused adapters do not sit at the same locations: layer {loc.layer}'s "
                    f"{loc.site.location} location holds {', '.join(map(repr, present))} but not "
                    f"{', '.join(map(repr, missing))}; fuse adapters with the same mh_adapter, output_adapter and leave_out "
                    "settings (e.g. seq_bn with par_bn, not with double_seq_bn)")
            if present:
                locations.append(loc)
        return locations

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
        state = fusions(self._host)
        if fuse.name in state.configs:
            if not overwrite_ok:
                raise ValueError(f"an adapter fusion named {fuse.name!r} already exists")
            self.delete_adapter_fusion(fuse)
        locations = self._fusion_locations(fuse)
        if not locations:
            raise ValueError(f"{fuse!r}: the fused adapters share no location")
        host = self._host
        ref = host.reference()
        dropout = float(getattr(host.config, "attention_probs_dropout_prob", 0.0) or 0.0)
        for loc in locations:
            layer = FusionLayer(cfg, host.hidden, dropout).to(device=ref.device, dtype=ref.dtype)
            loc.fusions[fuse.name] = layer
        state.configs[fuse.name] = cfg
        state.members[fuse.name] = tuple(fuse.flatten())
        self.train(self.training)
        if set_active:
            self.set_active_adapters(fuse)

    def delete_adapter_fusion(self, fusion: Fuse | list[str] | str) -> None:
        fuse = _as_fuse(fusion)
        if fuse.name not in fusions(self._host).configs:
            raise ValueError(f"no adapter fusion named {fuse.name!r}")
        remove_fusion(self._host, fuse.name)

    def fusion_named_parameters(self, fusion: Fuse | list[str] | str) -> list[tuple[str, nn.Parameter]]:
        name = _as_fuse(fusion).name
        mark = f".adapter_fusion_layer.{name}."
        prefix = self._key_prefix()
        return [(prefix + k, p) for k, p in self.adapter_base.named_parameters() if mark in "." + k]

    def train_adapter_fusion(self, fusion: Fuse | list[str] | str, unfreeze_adapters: bool = False) -> None:
        """Train only the fusion layers (and optionally the fused adapters); the backbone stays frozen."""
        fuse = _as_fuse(fusion)
        if fuse.name not in fusions(self._host).configs:
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
        cfg = fusions(self._host).configs.get(fuse.name)
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

    def fusion_nbytes(self, fusion: Fuse | list[str] | str) -> int:
        return sum(p.numel() * p.element_size() for _, p in self.fusion_named_parameters(fusion))

    def load_adapter_fusion(
        self, directory: str | os.PathLike[str], set_active: bool = False,
        adapter_names: Sequence[str] | None = None, load_as: str | None = None,
    ) -> Fuse:
        """Load a saved fusion. `adapter_names` fuses these adapters instead of the saved ones (same count,
        same order); `load_as` names the fusion layer in this model (its keys are renamed to match)."""
        folder = Path(directory)
        meta = read_json(folder / FUSION_CONFIG)
        saved = _saved_fuse(meta)
        names = list(saved.children) if adapter_names is None else list(adapter_names)
        if len(names) != len(saved.children):
            raise ValueError(f"the fusion fuses {len(saved.children)} adapters, {len(names)} names given")
        default = saved.name if adapter_names is None else None
        fuse = Fuse(*names, name=load_as or default)
        state = read_safetensors(folder / FUSION_WEIGHTS)
        if not state:
            raise ValueError(f"{FUSION_WEIGHTS} is missing or empty in {folder}")
        old_mark, new_mark = f".adapter_fusion_layer.{saved.name}.", f".adapter_fusion_layer.{fuse.name}."
        foreign = sorted(k for k in state if old_mark not in "." + k)
        if foreign:
            raise ValueError(f"fusion keys do not belong to fusion {saved.name!r}: {', '.join(foreign[:5])}")
        state = {("." + k).replace(old_mark, new_mark, 1)[1:]: v for k, v in state.items()}
        self.add_adapter_fusion(fuse, AdapterFusionConfig.from_dict(_config(meta)), overwrite_ok=True)
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

    def inspect_fusion_dir(self, path: str | os.PathLike[str], adapter_dirs: Sequence[str | os.PathLike[str]]) -> FusionInfo:
        """Validate a saved fusion over the adapters saved in `adapter_dirs` (in the fusion's order) without
        touching this model: both load into the meta-device copy that inspect_adapter_dir uses."""
        meta = read_json(Path(path) / FUSION_CONFIG)
        saved = _saved_fuse(meta)
        if len(adapter_dirs) != len(saved.children):
            raise ValueError(f"the fusion fuses {len(saved.children)} adapters, {len(adapter_dirs)} given")
        with self._inspection() as skeleton:
            probes: list[str] = []
            try:
                for i, folder in enumerate(adapter_dirs):
                    probes.append(skeleton.load_adapter(str(folder), load_as=f"__fusion_probe_{i}", allow_pickle=False))
                try:
                    fuse = skeleton.load_adapter_fusion(path, adapter_names=probes, load_as="__fusion_probe")
                except ValueError as exc:
                    raise ValueError(_unprobed(str(exc), probes, saved)) from None
                nbytes = skeleton.fusion_nbytes(fuse)
            finally:
                for probe in probes:
                    if skeleton.has_adapter(probe):
                        skeleton.delete_adapter(probe)  # its fusions go with it
        return FusionInfo(tuple(str(c) for c in saved.children), dict(_config(meta)), nbytes)
