"""The LoRA room's `Method`: low-rank updates on the declared linear layers, named ``<module>.loras.<name>.lora_A``."""

from __future__ import annotations

import typing

from ...composition import AdapterCompositionBlock
from ...configuration import AdapterConfigBase
from ...formats import AdapterFiles, PeftFiles
from ...routing import RowPlan
from ..base import Host, Method
from .config import LoRAConfig
from .layer import LinearAdapter, LoRA
from .merge import MergeAPI
from .peft import lora_from_peft
from .targets import ROOM, lora_targets, place_linear_adapters, remove_linear_adapters, wire_targets


def _lora(config: LoRAConfig, in_features: int, out_enabled: int, groups: int) -> LinearAdapter:
    return LoRA(in_features, out_enabled, groups, config)


class LoRAMethod(Method):
    """LoRA (composition_mode "add"); the targets it wires also carry (IA)^3, see the ia3 room."""

    name = ROOM
    config_types = (LoRAConfig,)
    key_slots = ("loras",)
    peft_type = "LORA"
    api = MergeAPI

    def handles(self, config: AdapterConfigBase) -> bool:
        return isinstance(config, LoRAConfig) and config.composition_mode == "add"

    def wire(self, host: Host) -> None:
        host.rooms[self.name] = wire_targets(host)

    def add(self, host: Host, name: str, config: AdapterConfigBase) -> None:
        place_linear_adapters(host, name, typing.cast(LoRAConfig, config), _lora)

    def remove(self, host: Host, name: str) -> None:
        remove_linear_adapters(host, name)

    def check_setup(self, host: Host, setup: AdapterCompositionBlock, plan: RowPlan | None) -> None:
        """Stacks of several LoRA/IA3 adapters on a fused projection are refused (AdapterHub refuses them too)."""
        if plan is None:
            return
        stacks = {stack for stack in plan.rows if len(stack) > 1}
        for target in lora_targets(host):
            if target.fused:
                for stack in stacks:
                    live = [n for n in stack if n in target.loras and n != target.merged]
                    if len(live) > 1:
                        raise ValueError(
                            f"Stack{tuple(live)!r}: stacking LoRA/IA3 adapters on the fused projection "
                            f"{target.site.module} is not supported (AdapterHub refuses it as well)"
                        )

    def from_peft(self, host: Host, peft: PeftFiles) -> AdapterFiles:
        return lora_from_peft(host, peft)
