"""The bottleneck room's `Method`: its locations on a model, creating and removing adapters there, its key names.

Files name a bottleneck's tensors ``<layer path>.<container>.adapters.<name>.adapter_down.0.weight``
(the container as the architecture declares it, e.g. ``output`` or GPT-2's ``output_adapters``).
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ...configuration import AdapterConfigBase
from ..base import Host, Method
from .adapter import BottleneckAdapter, Projection
from .config import BnConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from .hooks import BottleneckLocation, wire_location
from .site import BottleneckSite


@dataclass
class BottleneckState:
    """A model's bottleneck locations, by (layer, location name)."""

    locations: dict[tuple[int, str], BottleneckLocation] = field(default_factory=dict)

    def __iter__(self) -> Iterator[BottleneckLocation]:
        return iter(self.locations.values())


def bottlenecks(host: Host) -> BottleneckState:
    """The bottleneck room's state on `host` (other rooms that build on bottlenecks read it here)."""
    return host.rooms[BottleneckMethod.name]


def place_bottlenecks(host: Host, name: str, config: BnConfig, projection: Projection = nn.Linear) -> None:
    """Put a BottleneckAdapter for adapter `name` at every location `config` selects (leave_out excluded)."""
    added = 0
    for loc in bottlenecks(host):
        if loc.layer in config.leave_out or not getattr(config, loc.site.location):
            continue
        down = int(host.hidden // config.reduction_factor_for(loc.layer))
        if projection is nn.Linear:  # a PHM projection holds its adapter's shared parameters: never reused
            key = ("bottleneck", loc.layer, loc.site.location, down, config)
            loc.adapters[name] = host.stack_cache.spares.build(key, BottleneckAdapter, host.hidden, down, config)
        else:
            loc.adapters[name] = BottleneckAdapter(host.hidden, down, config, projection)
        added += 1
    if not added:
        raise ValueError(f"bottleneck config for {name!r} places no adapter (check leave_out and locations)")


def remove_bottlenecks(host: Host, name: str) -> None:
    """Drop adapter `name` from every location (a no-op where it has none)."""
    for loc in bottlenecks(host):
        if name in loc.adapters:
            host.stack_cache.spares.keep(loc.adapters[name])
            del loc.adapters[name]


def dedupe_layer_norm_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop AdapterHub's second name for a bottleneck's ln_before LayerNorm.

    With ln_before=True AdapterHub's adapter holds the LayerNorm both as `adapter_norm_before` and as
    `adapter_down.0` (the first entry of the Sequential), and it saves `model.state_dict()`, which lists
    the tensors under both names. We keep `adapter_norm_before.*` and drop an `adapter_down.0.*` entry
    that holds the very same values.
    """
    out = dict(state)
    for key, value in state.items():
        for part in ("weight", "bias"):
            suffix = f".adapter_norm_before.{part}"
            if key.endswith(suffix):
                alias = key[: -len(suffix)] + f".adapter_down.0.{part}"
                other = out.get(alias)
                if other is not None and other.shape == value.shape and torch.equal(other, value):
                    del out[alias]
    return out


class BottleneckMethod(Method):
    """seq_bn, double_seq_bn, par_bn and any other bottleneck with nn.Linear projections."""

    name = "bottleneck"
    config_types = (BnConfig, SeqBnConfig, DoubleSeqBnConfig, ParBnConfig)
    key_slots = ("adapters",)

    def handles(self, config: AdapterConfigBase) -> bool:
        return isinstance(config, BnConfig) and not config.phm_layer

    def wire(self, host: Host) -> None:
        state = BottleneckState()
        for i, layer, site in host.sites(BottleneckSite):
            loc = wire_location(i, layer, site, host.stack_cache)
            state.locations[loc.key] = loc
        host.rooms[self.name] = state

    def add(self, host: Host, name: str, config: AdapterConfigBase) -> None:
        place_bottlenecks(host, name, typing.cast(BnConfig, config))

    def remove(self, host: Host, name: str) -> None:
        remove_bottlenecks(host, name)

    def translate_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dedupe_layer_norm_aliases(state)
