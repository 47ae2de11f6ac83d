"""The contract between the generic adapter mixin and the method rooms: `Method`, and the `Host` it works on.

A room (``methods/<method>/``) gives the model one `Method` object, listed in ``methods/registry.py``;
``model.py`` never names a method, it loops over that list. A room sees a model only as a `Host`: the
base model, its layers, its architecture's declarations (read through `Architecture`, which
``models.base.ArchSpec`` provides, so rooms never import an architecture file) and each room's own state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn

from ..composition import AdapterCompositionBlock
from ..configuration import AdapterConfigBase
from ..formats import AdapterFiles, PeftFiles
from ..routing import RowPlan
from .stack_cache import StackCache

S = TypeVar("S")


class Architecture(Protocol):
    """What a room reads of an architecture declaration."""

    layers: str
    attention: str

    def sites_of(self, kind: type[S]) -> tuple[S, ...]:
        """The declared sites of one kind (a room's own site class, e.g. BottleneckSite)."""
        ...

    def layer_groups(self) -> tuple[Any, ...]:
        """The layer lists (encoder, decoder, ...), each with `.layers` (a path) and `.sites`."""
        ...

    def n_kv_heads(self, config: Any) -> int: ...

    def head_dim(self, config: Any) -> int: ...


@dataclass
class Host:
    """One wired base model as the rooms see it.

    `rooms` holds each room's per-model state by room name; `stack_cache` is the one cache of stacked
    adapter weights every site of the model shares (bounded by bytes, see methods.stack_cache).
    """

    base: nn.Module
    arch: Architecture
    layers: tuple[nn.Module, ...]
    stack_cache: StackCache = field(default_factory=StackCache)
    rooms: dict[str, Any] = field(default_factory=dict)
    layer_sites: tuple[tuple[Any, ...], ...] = ()
    group_starts: tuple[int, ...] = (0,)
    layer_paths: tuple[str, ...] = ()

    def layer_path(self, layer: int) -> str:
        """The dotted path of layer `layer` in the base model (e.g. ``decoder.block.0`` for layer 2 of a 2 + 2 T5)."""
        return self.layer_paths[layer] if self.layer_paths else f"{self.arch.layers}.{layer}"

    def sites(self, kind: type[S]) -> list[tuple[int, nn.Module, S]]:
        """(AdapterHub's layer index, layer, site) for every declared site of one kind, in layer order.

        Layers are counted over all layer lists (a decoder's continue after its encoder's)."""
        per_layer = self.layer_sites or tuple(self.arch.sites_of(kind) for _ in self.layers)
        return [(i, layer, site) for i, (layer, sites) in enumerate(zip(self.layers, per_layer, strict=True))
                for site in sites if isinstance(site, kind)]

    def group_start(self, layer: int) -> int:
        """The index of the first layer of the layer list that holds `layer`."""
        return max(s for s in self.group_starts if s <= layer)

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def hidden(self) -> int:
        return int(self.base.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def reference(self) -> torch.Tensor:
        """A backbone parameter: new adapter modules take its device and dtype."""
        return next(self.base.parameters())


@dataclass(frozen=True)
class OutputRows:
    """Which rows of one forward pass a tensor before an LM head's output embeddings holds.

    The tensor holds rows [start, start + its batch size) of the forward's `n_rows` rows (counted after
    Parallel replicated the batch), which ran under `setup`.
    """

    setup: AdapterCompositionBlock
    n_rows: int
    start: int = 0


class Method:
    """One method room's entry points; a room subclasses it and overrides what its method needs.

    `name` keys the room's state in `Host.rooms`; `config_types` are the config classes the room defines
    (importing the room registers their string names and AdapterHub architectures); `key_slots` are the
    state-dict key segments after which AdapterHub writes the adapter name (``adapters``, ``loras``, ...);
    `peft_type` is the PEFT folder type the room translates; `api` is a mixin of model methods the room
    adds (``merge_adapter``, ...).
    """

    name: ClassVar[str] = ""
    config_types: ClassVar[tuple[type, ...]] = ()
    key_slots: ClassVar[tuple[str, ...]] = ()
    peft_type: ClassVar[str | None] = None
    api: ClassVar[type | None] = None

    def handles(self, config: AdapterConfigBase) -> bool:
        """Whether this room builds modules for one (single-method) config."""
        return False

    def wire(self, host: Host) -> None:
        """Once per base model: create the room's containers and install its hooks at the declared sites."""

    def add(self, host: Host, name: str, config: AdapterConfigBase) -> None:
        """Build adapter `name`'s modules for `config` (one this room handles)."""

    def remove(self, host: Host, name: str) -> None:
        """Drop whatever the room holds for adapter `name` (a no-op when it holds nothing)."""

    def check_setup(self, host: Host, setup: AdapterCompositionBlock, plan: RowPlan | None) -> None:
        """Refuse, before any tensor is touched, a setup the room cannot honour (ValueError)."""

    def fixed_parameter(self, config: AdapterConfigBase, key: str) -> bool:
        """True for a parameter of `config`'s adapter that training leaves frozen."""
        return False

    def translate_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An AdapterHub file's tensors with the room's alias keys folded into the keys it builds."""
        return state

    def before_output_embeddings(self, host: Host, hidden: torch.Tensor, rows: OutputRows) -> torch.Tensor:
        """The hidden states an LM head feeds its output embeddings (vocabulary projection), as this room
        changes them; unchanged by default."""
        return hidden

    def from_peft(self, host: Host, peft: PeftFiles) -> AdapterFiles:
        """A PEFT folder of type `peft_type` as the AdapterHub layout this library loads."""
        raise ValueError(f"the {self.name} room reads no PEFT folders")


class Holder(nn.Module):
    """An empty module that only carries children (e.g. GPT-2's `attention_adapters`)."""


def child_module(parent: nn.Module, name: str, factory: Callable[[], nn.Module]) -> nn.Module:
    """`parent.<name>`, created with `factory` the first time (where AdapterHub's key path puts a container)."""
    if name not in parent._modules:
        parent.add_module(name, factory())
    return parent._modules[name]


def get_path(root: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path ("" is `root` itself); "a|b" is the first of the paths that exists."""
    options = path.split("|")
    for n, option in enumerate(options):
        module = root
        try:
            for part in option.split(".") if option else ():
                module = getattr(module, part)
        except AttributeError:
            if n == len(options) - 1:
                raise
            continue
        return module
    raise AttributeError(path)


def resolve_path(root: nn.Module, path: str) -> str:
    """The option of an "a|b" path that `get_path` takes (a plain path as it is)."""
    for option in path.split("|"):
        try:
            get_path(root, option)
        except AttributeError:
            continue
        return option
    raise AttributeError(path)


def container(layer: nn.Module, path: str) -> nn.Module:
    """The module at `path` in `layer`, its last segment created as an empty Holder when missing."""
    parent, _, last = path.rpartition(".")
    return child_module(get_path(layer, parent), last, Holder)
