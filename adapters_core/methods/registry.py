"""The method rooms, in the order they are wired onto a model. Adding a method: its folder, and one line here.

Order matters where a room builds on another's state: phm and fusion on bottleneck, ia3 on lora.
"""

from __future__ import annotations

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
