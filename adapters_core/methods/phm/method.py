"""The Compacter room's `Method`: bottlenecks whose projections are PHM layers, plus the shared PHM rule.

It builds on the bottleneck room (same locations, same hooks, same batched kernels, which read a PHM
layer's computed weight through `linear_params()`); what it adds is the projection and the per-adapter
shared parameters, named ``<base>.shared_parameters.<name>.phm_rule`` in files.
"""

from __future__ import annotations

import typing

from torch import nn

from ...configuration import AdapterConfigBase
from ..base import Host, Method, child_module
from ..bottleneck.config import BnConfig
from ..bottleneck.method import place_bottlenecks, remove_bottlenecks
from .config import CompacterConfig, CompacterPlusPlusConfig
from .layer import PHMLayer, make_shared_phm_parameters


def shared_parameters(host: Host) -> nn.ModuleDict:
    return host.rooms[PHMMethod.name]


class PHMMethod(Method):
    """Compacter and Compacter++ (any bottleneck with phm_layer=True)."""

    name = "phm"
    config_types = (CompacterConfig, CompacterPlusPlusConfig)
    key_slots = ("adapters", "shared_parameters")

    def handles(self, config: AdapterConfigBase) -> bool:
        return isinstance(config, BnConfig) and config.phm_layer

    def wire(self, host: Host) -> None:
        host.rooms[self.name] = child_module(host.base, "shared_parameters", nn.ModuleDict)

    def add(self, host: Host, name: str, config: AdapterConfigBase) -> None:
        config = typing.cast(BnConfig, config)
        shared = make_shared_phm_parameters(config)
        if len(shared):
            shared_parameters(host)[name] = shared

        def projection(in_features: int, out_features: int) -> PHMLayer:
            return PHMLayer(in_features, out_features, config, shared)

        place_bottlenecks(host, name, config, projection)

    def remove(self, host: Host, name: str) -> None:
        remove_bottlenecks(host, name)
        shared = shared_parameters(host)
        if name in shared:
            del shared[name]

    def fixed_parameter(self, config: AdapterConfigBase, key: str) -> bool:
        """learn_phm=False: the PHM rule stays fixed."""
        return isinstance(config, BnConfig) and not config.learn_phm and key.rsplit(".", 1)[-1].startswith("phm_rule")
