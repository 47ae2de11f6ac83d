"""The invertible room's `Method`: one coupling block per adapter on the embedding output, inverted before
an LM head's output embeddings.

The blocks live in ``<base>.invertible_adapters.<name>`` (AdapterHub's keys, e.g.
``bert.invertible_adapters.<name>.F.0.weight``). The embedding output is the first layer's input (what
AdapterHub hooks: BERT's ``embeddings``, GPT-2's ``drop``, Llama's ``embed_tokens``), so no architecture
declares anything for this room. The bottleneck part of the same config is the bottleneck room's.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...configuration import AdapterConfigBase
from ...routing import ForwardContext
from ..base import Host, Method, OutputRows, child_module
from ..bottleneck.config import BnConfig
from .apply import InvertibleRouting, apply_invertible, first_adapters
from .config import DoubleSeqBnInvConfig, SeqBnInvConfig, invertible_spec
from .layer import build_invertible

SLOT = "invertible_adapters"


def invertible_adapters(host: Host) -> nn.ModuleDict:
    """The model's coupling blocks by adapter name."""
    return host.rooms[InvertibleMethod.name]


def _first_adapters(setup: Any, n_rows: int) -> tuple[str | None, ...]:
    """Row -> the first adapter of its setup, kept for the rest of the forward pass (the LM head reads it too)."""
    ctx = ForwardContext.current()
    if ctx is None or ctx.setup is not setup:
        return first_adapters(setup, n_rows)
    key = (SLOT, n_rows)
    if key not in ctx.stash:
        ctx.stash[key] = first_adapters(setup, n_rows)
    return ctx.stash[key]


def _embedding_hook(modules: nn.ModuleDict) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ctx = ForwardContext.current()
        if ctx is None or ctx.setup is None or not len(modules):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        routing = InvertibleRouting.build(_first_adapters(ctx.setup, int(hidden.shape[0])), modules)
        if not routing.groups:
            return None
        hidden = apply_invertible(hidden, routing, modules)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
    return hook


class InvertibleMethod(Method):
    """NICE or GLOW coupling blocks of bottleneck configs with ``inv_adapter`` set."""

    name = "invertible"
    config_types = (SeqBnInvConfig, DoubleSeqBnInvConfig)
    key_slots = (SLOT,)

    def handles(self, config: AdapterConfigBase) -> bool:
        return isinstance(config, BnConfig) and config.inv_adapter is not None

    def wire(self, host: Host) -> None:
        modules = typing.cast(nn.ModuleDict, child_module(host.base, SLOT, nn.ModuleDict))
        host.rooms[self.name] = modules
        host.layers[0].register_forward_pre_hook(_embedding_hook(modules), with_kwargs=True)

    def add(self, host: Host, name: str, config: AdapterConfigBase) -> None:
        spec = invertible_spec(typing.cast(BnConfig, config))
        if spec is not None:
            invertible_adapters(host)[name] = build_invertible(spec, host.hidden)

    def remove(self, host: Host, name: str) -> None:
        modules = invertible_adapters(host)
        if name in modules:
            del modules[name]

    def before_output_embeddings(self, host: Host, hidden: torch.Tensor, rows: OutputRows) -> torch.Tensor:
        modules = invertible_adapters(host)
        if not len(modules):
            return hidden
        names = _first_adapters(rows.setup, rows.n_rows)[rows.start : rows.start + int(hidden.shape[0])]
        return apply_invertible(hidden, InvertibleRouting.build(names, modules), modules, rev=True)
