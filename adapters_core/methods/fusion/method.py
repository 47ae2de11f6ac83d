"""The AdapterFusion room's `Method`: fusions are added through their own API, not through add_adapter.

What the generic mixin needs from this room: deleting an adapter deletes the fusions over it, and a setup
that names a fusion without layers is refused before the forward pass. Fusion layers hang at the
bottleneck locations (``<container>.adapter_fusion_layer.<fusion>``) and are run by the bottleneck
room's tree interpreter; they are saved apart (adapter_fusion_config.json + model_adapter_fusion.safetensors).
"""

from __future__ import annotations

from ...composition import AdapterCompositionBlock, Fuse
from ...routing import RowPlan
from ..base import Host, Method
from .api import ROOM, FusionAPI, FusionState, fusions, remove_fusion
from .config import AdapterFusionConfig, DynamicAdapterFusionConfig, StaticAdapterFusionConfig


def fuse_blocks(block: AdapterCompositionBlock | str | None) -> list[Fuse]:
    """Every Fuse block in a setup, outermost first."""
    if isinstance(block, Fuse):
        return [block, *(f for c in block.children for f in fuse_blocks(c))]
    if isinstance(block, AdapterCompositionBlock):
        return [f for c in block.children for f in fuse_blocks(c)]
    return []


class FusionMethod(Method):
    """AdapterFusion over bottleneck adapters (it needs the bottleneck room wired first)."""

    name = ROOM
    config_types = (AdapterFusionConfig, DynamicAdapterFusionConfig, StaticAdapterFusionConfig)
    api = FusionAPI

    def wire(self, host: Host) -> None:
        host.rooms[self.name] = FusionState()

    def remove(self, host: Host, name: str) -> None:
        state = fusions(host)
        for fusion in [f for f, members in state.members.items() if name in members]:
            remove_fusion(host, fusion)

    def check_setup(self, host: Host, setup: AdapterCompositionBlock, plan: RowPlan | None) -> None:
        configs = fusions(host).configs
        for fuse in fuse_blocks(setup):
            if fuse.name not in configs:
                raise ValueError(f"{fuse!r}: no AdapterFusion layer named {fuse.name!r}; call add_adapter_fusion first")
