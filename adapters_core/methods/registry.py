"""The method rooms, in the order they are wired onto a model. Adding a method: its folder, and one line here.

Order matters where a room builds on another's state: phm and fusion on bottleneck, ia3 on lora.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..configuration import AdapterConfigBase
from .base import Method
from .bottleneck.method import BottleneckMethod
from .fusion.method import FusionMethod
from .ia3.method import IA3Method
from .invertible.method import InvertibleMethod
from .lora.method import LoRAMethod
from .mam import MAMConfig
from .phm.method import PHMMethod
from .prefix_tuning.method import PrefixTuningMethod

METHODS: tuple[Method, ...] = (
    BottleneckMethod(),
    PHMMethod(),
    PrefixTuningMethod(),
    LoRAMethod(),
    IA3Method(),
    FusionMethod(),
    InvertibleMethod(),
)

#: Config presets that combine several rooms' configs (their names are registered on import).
CONFIG_PRESETS: tuple[type[AdapterConfigBase], ...] = (MAMConfig,)


def methods_for(config: AdapterConfigBase) -> tuple[Method, ...]:
    """The rooms that build modules for one single-method config."""
    return tuple(m for m in METHODS if m.handles(config))


def key_slots() -> tuple[str, ...]:
    """Every state-dict key segment after which an adapter's name stands, over all rooms."""
    return tuple(dict.fromkeys(slot for m in METHODS for slot in m.key_slots))


def room_apis() -> tuple[type, ...]:
    """The model-method mixins the rooms add (merge_adapter, eject_prefix_tuning, add_adapter_fusion, ...)."""
    return tuple(m.api for m in METHODS if m.api is not None)


Containers = tuple[tuple[str, nn.ModuleDict], ...]


def adapter_containers(root: nn.Module, path: str = "") -> Iterator[tuple[str, nn.ModuleDict]]:
    """(dotted path, container) of every per-adapter container under `root` (a ModuleDict named by a
    `key_slots` segment), depth first. The walk never enters a container, so its cost follows the backbone's
    size, not the number of adapters loaded."""
    for child_name, child in root._modules.items():
        if child is None:
            continue
        child_path = f"{path}{child_name}"
        if child_name in _KEY_SLOTS and isinstance(child, nn.ModuleDict):
            yield child_path, child
            continue
        yield from adapter_containers(child, child_path + ".")


def adapter_entries(containers: Containers, name: str) -> Iterator[tuple[str, nn.Module]]:
    """(dotted path, module) of adapter `name` in each of `containers`, in their order."""
    for path, container in containers:
        if (entry := container._modules.get(name)) is not None:
            yield f"{path}.{name}", entry


_KEY_SLOTS = frozenset(key_slots())
