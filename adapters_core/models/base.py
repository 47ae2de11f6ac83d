"""Architecture declarations: where each adapter method attaches in a Hugging Face model family.

An architecture file only declares module paths (`ArchSpec` with the method rooms' site declarations,
e.g. `BottleneckSite`, `LoRASite`); the rooms read them (through `methods.base.Architecture`) to attach
their hooks. Paths are relative to one transformer layer unless noted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from ..methods.base import get_path
from ..methods.bottleneck.site import BottleneckSite
from ..methods.lora.site import LoRASite
from ..methods.prefix_tuning.site import PrefixSite

__all__ = [
    "ArchSpec", "BottleneckSite", "LayerGroup", "LoRASite", "PrefixSite", "get_path", "register", "spec_for",
    "supported_model_types",
]

S = TypeVar("S")


@dataclass(frozen=True)
class LayerGroup:
    """One layer list of the base model (`layers`, a path) and the site declarations of each of its layers."""

    layers: str
    sites: tuple[Any, ...]


@dataclass(frozen=True)
class ArchSpec:
    """Everything adapters_core needs to know about one model family.

    Single-stack families give `layers` (the path of the layer list in the base model), `attention` (the
    attention module in a layer, which gets self prefixes) and `sites` (every method room's site
    declarations for one layer). Encoder-decoders give `groups` instead, in AdapterHub's layer order
    (encoder first; layer indices continue across groups), and `entries`: submodules that are called
    on their own (an encoder during generate) and so also enter the adapter setup.
    """

    model_types: tuple[str, ...]
    adapter_model_class: str
    layers: str = ""
    attention: str = ""
    sites: tuple[Any, ...] = ()
    groups: tuple[LayerGroup, ...] = ()
    entries: tuple[str, ...] = ()

    def layer_groups(self) -> tuple[LayerGroup, ...]:
        if self.groups:
            return self.groups
        return (LayerGroup(self.layers, (*self.sites, PrefixSite(self.attention))),)

    def sites_of(self, kind: type[S]) -> tuple[S, ...]:
        return tuple(site for group in self.layer_groups() for site in group.sites if isinstance(site, kind))

    def n_heads(self, config: Any) -> int:
        return int(config.num_attention_heads)

    def n_kv_heads(self, config: Any) -> int:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    def head_dim(self, config: Any) -> int:
        return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec
    return spec


def spec_for(model_type: str) -> ArchSpec:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ValueError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(_REGISTRY))}"
        ) from None


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))
