"""The prefix tuning room's `Method`: a prefix module per adapter and the attention wrapper that applies it.

Files name the tensors ``<base>.prefix_tuning.prefix_tunings.<name>.<location>_prefix.control_trans...``
(self_prefix; encoder-decoders also encoder_prefix and cross_prefix, switched by the config's
encoder_prefix/cross_prefix); AdapterHub's .bin files repeat each under every layer's attention pool,
folded back here.
"""

from __future__ import annotations

import typing

import torch
from torch import nn

from ...composition import AdapterCompositionBlock
from ...configuration import AdapterConfigBase
from ...routing import RowPlan
from ..base import Holder, Host, Method, child_module, get_path
from .attention import install_prefix_attention
from .config import PrefixTuningConfig
from .eject import EjectAPI
from .kv_cache import PrefixCacheAPI
from .module import PrefixTuningModule
from .routing import ROOM, PrefixState, lookup, prefixes
from .rule import check_implementation
from .site import PrefixSite

# AdapterHub's .bin files repeat every prefix tensor under each layer's attention pool; keep one copy.
_PREFIX_ALIAS = ".prefix_tuning.pool.prefix_tunings."
_CANONICAL = ".prefix_tuning.prefix_tunings."


def dedupe_prefix_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map AdapterHub's per-layer prefix aliases onto the model-level `prefix_tuning.prefix_tunings` keys."""
    out: dict[str, torch.Tensor] = {}
    canonical = any(_CANONICAL in "." + key for key in state)
    for key, value in state.items():
        if _PREFIX_ALIAS in key and canonical:
            continue
        if _PREFIX_ALIAS in key:
            root, rest = key.split(".", 1)[0], key.split(_PREFIX_ALIAS, 1)[1]
            out.setdefault(f"{root}.prefix_tuning.prefix_tunings.{rest}", value)
        else:
            out[key] = value
    return out


class PrefixTuningAPI(EjectAPI, PrefixCacheAPI):
    """The room's model methods: eject_prefix_tuning, cached_prefix, prefixes_in_cache."""


class PrefixTuningMethod(Method):
    """Prefix tuning (reparameterised or flat); every attention layer gets the rows' prefixes."""

    name = ROOM
    config_types = (PrefixTuningConfig,)
    key_slots = ("prefix_tunings",)
    api = PrefixTuningAPI

    def handles(self, config: AdapterConfigBase) -> bool:
        return isinstance(config, PrefixTuningConfig)

    def wire(self, host: Host) -> None:
        holder = child_module(host.base, "prefix_tuning", Holder)
        state = PrefixState(child_module(holder, "prefix_tunings", nn.ModuleDict))
        for i, layer, site in host.sites(PrefixSite):
            attention = get_path(layer, site.attention)
            attention._adapterserve_layer = i
            attention._adapterserve_location = site.location
            attention._adapterserve_prefix = state
            if site.relative_bias:  # kept out of _modules: not a submodule of this attention
                attention.__dict__["_adapterserve_bias"] = get_path(host.layers[host.group_start(i)],
                                                                    site.relative_bias)
            state.locations.setdefault(site.location, []).append(i)
        install_prefix_attention(lookup)
        host.rooms[self.name] = state

    def add(self, host: Host, name: str, config: AdapterConfigBase) -> None:
        config = typing.cast(PrefixTuningConfig, config)
        check_implementation(host.config._attn_implementation)
        arch, conf = host.arch, host.config
        state = prefixes(host)
        modules: dict[str, PrefixTuningModule] = {}
        index: dict[str, dict[int, int]] = {}
        for location, all_layers in state.locations.items():
            if not getattr(config, f"{location}_prefix", True):
                continue
            layers = [i for i in all_layers if i not in config.leave_out]
            if not layers:
                continue
            shape = (len(layers), arch.n_kv_heads(conf), arch.head_dim(conf), host.hidden)
            modules[f"{location}_prefix"] = host.stack_cache.spares.build(
                ("prefix", location, tuple(layers), shape, config), PrefixTuningModule, *shape, config)
            index[location] = {layer: j for j, layer in enumerate(layers)}
        if not modules:
            raise ValueError(f"prefix tuning config for {name!r} leaves out every layer")
        state.prefix_tunings[name] = nn.ModuleDict(modules)
        state.layer_index[name] = index

    def remove(self, host: Host, name: str) -> None:
        state = prefixes(host)
        if name in state.prefix_tunings:
            for module in state.prefix_tunings[name].values():
                host.stack_cache.spares.keep(module)
            del state.prefix_tunings[name]
        state.layer_index.pop(name, None)

    def check_setup(self, host: Host, setup: AdapterCompositionBlock, plan: RowPlan | None) -> None:
        """A prefix adapter in the setup needs an attention implementation that carries it (rule.py)."""
        present = prefixes(host).prefix_tunings
        if any(name in present for name in setup.flatten()):
            check_implementation(host.config._attn_implementation)

    def translate_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dedupe_prefix_aliases(state)
