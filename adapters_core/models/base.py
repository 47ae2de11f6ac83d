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

__all__ = [
    "ArchSpec", "BottleneckSite", "LoRASite", "get_path", "register", "spec_for", "supported_model_types",
]

S = TypeVar("S")


@dataclass(frozen=True)
class ArchSpec:
    """Everything adapters_core needs to know about one model family.

    `layers` is the path of the layer list in the base model, `attention` the attention module in a
    layer, `sites` every method room's site declarations for one layer.
    """

    model_types: tuple[str, ...]
    layers: str
    attention: str
    sites: tuple[Any, ...]
    adapter_model_class: str

    def sites_of(self, kind: type[S]) -> tuple[S, ...]:
        return tuple(site for site in self.sites if isinstance(site, kind))

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
