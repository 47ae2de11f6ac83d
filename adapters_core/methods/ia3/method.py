"""The (IA)^3 room's `Method`: scaling vectors on the LoRA room's linear-layer targets (same keys, ``loras.<name>``)."""

from __future__ import annotations

import typing

from ...configuration import AdapterConfigBase
from ...formats import AdapterFiles, PeftFiles
from ..base import Host, Method
from ..lora.config import LoRAConfig
from ..lora.layer import LinearAdapter
from ..lora.targets import place_linear_adapters, remove_linear_adapters
from .config import IA3Config
from .layer import IA3
from .peft import ia3_from_peft


def _ia3(config: LoRAConfig, in_features: int, out_enabled: int, groups: int) -> LinearAdapter:
    return IA3(out_enabled, config)


class IA3Method(Method):
    """(IA)^3: a LoRA config with composition_mode "scale"; it needs the LoRA room wired first."""

    name = "ia3"
    config_types = (IA3Config,)
    key_slots = ("loras",)
    peft_type = "IA3"

    def handles(self, config: AdapterConfigBase) -> bool:
        return isinstance(config, LoRAConfig) and config.composition_mode == "scale"

    def add(self, host: Host, name: str, config: AdapterConfigBase) -> None:
        place_linear_adapters(host, name, typing.cast(LoRAConfig, config), _ia3)

    def remove(self, host: Host, name: str) -> None:
        remove_linear_adapters(host, name)

    def from_peft(self, host: Host, peft: PeftFiles) -> AdapterFiles:
        return ia3_from_peft(host, peft)
