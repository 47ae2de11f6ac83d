"""The adapter mixin: add/delete/activate/train/save/load/inspect on any supported HF model, for every method.

`init(model)` wires the model's base once and mixes `AdapterModelMixin` into its class, like AdapterHub's
`adapters.init`. Wiring builds a `Host` from the architecture declaration and lets every method room
(`methods.registry.METHODS`) attach its hooks; the mixin names no method, it asks the rooms. The base
model's forward is entered through a pre-hook that validates and compiles the active setup into a
routing plan before any tensor is touched. Method-specific model methods (merge_adapter,
eject_prefix_tuning, add_adapter_fusion, ...) come from the rooms' `api` mixins.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .composition import AdapterCompositionBlock, Split, parse_composition, validate_composition
from .configuration import AdapterConfigBase, method_kinds
from .context import AdapterSetup
from .formats import (
    FORMAT_VERSION,
    AdapterFiles,
    PeftFiles,
    is_peft_dir,
    public_model_name,
    read_adapter_dir,
    read_peft_dir,
    write_adapter_dir,
)
from .inspection import NAME_CHARS, InspectionAPI
from .methods.base import Host, OutputRows, get_path
from .methods.registry import (
    METHODS,
    Containers,
    adapter_containers,
    adapter_entries,
    key_slots,
    methods_for,
    room_apis,
)
from .methods.staging import copy_into
from .models import ArchSpec, spec_for
from .routing import ForwardContext, compile_setup, forward_context

# Segments after which AdapterHub puts the adapter name in a state-dict key.
_NAME_SLOTS = key_slots()


@dataclass
class Registry:
    """Per base model: the rooms' view of it, the adapters it holds and the statically active setup."""

    spec: ArchSpec
    host: Host
    configs: dict[str, AdapterConfigBase] = field(default_factory=dict)
    active: AdapterCompositionBlock | None = None
    hook_state: threading.local = field(default_factory=threading.local)
    # the per-adapter containers under one root, found once: the rooms make them all when they are wired
    containers: tuple[nn.Module, Containers] | None = None


def _check_name(name: str) -> None:
    if not name or not set(name) <= NAME_CHARS or "." in name:
        raise ValueError(f"invalid adapter name {name!r}: use letters, digits, '_' and '-' only")


def replicate_batch(value: Any, k: int) -> Any:
    """A batch tensor repeated k times along dim 0 (Parallel's copies); other values unchanged."""
    return value.repeat(k, *([1] * (value.dim() - 1))) if isinstance(value, torch.Tensor) else value


BATCH_KWARGS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
                 "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds", "labels")


def _batch_size(args: tuple, kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        if kwargs.get(key) is not None:
            return int(kwargs[key].shape[0])
    encoded = kwargs.get("encoder_outputs")
    if encoded is not None:
        return int(encoded[0].shape[0])
    if args and isinstance(args[0], torch.Tensor):
        return int(args[0].shape[0])
    raise ValueError("cannot find input_ids or inputs_embeds to size the batch")


def _seq_len(args: tuple, kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return int(kwargs[key].shape[1])
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
        return int(args[0].shape[1])
    return None


class AdapterModelMixin(InspectionAPI, *room_apis()):
    """Adapter management mixed into a transformers model by `init`."""

    # -- plumbing ----------------------------------------------------------------------------------
    @property
    def adapter_base(self) -> nn.Module:
        return self.base_model

    @property
    def adapters_registry(self) -> Registry:
        return self.adapter_base._adapterserve_registry

    @property
    def _host(self) -> Host:
        return self.adapters_registry.host

    def adapter_methods(self) -> dict[str, frozenset[str]]:
        return {name: method_kinds(cfg) for name, cfg in self.adapters_registry.configs.items()}

    def has_adapter(self, name: str) -> bool:
        return name in self.adapters_registry.configs

    @property
    def adapters_config(self) -> dict[str, AdapterConfigBase]:
        return dict(self.adapters_registry.configs)

    # -- add / delete ------------------------------------------------------------------------------
    def add_adapter(
        self, name: str, config: AdapterConfigBase | dict | str | None = None, overwrite_ok: bool = False,
        set_active: bool = False,
    ) -> None:
        _check_name(name)
        cfg = AdapterConfigBase.load(config if config is not None else "seq_bn")
        if self.has_adapter(name):
            if not overwrite_ok:
                raise ValueError(f"an adapter named {name!r} already exists")
            self.delete_adapter(name)
        host = self._host
        try:
            for member in cfg.methods():
                rooms = methods_for(member)
                if not rooms:
                    raise ValueError(f"unsupported adapter config {member!r}")
                for room in rooms:
                    room.add(host, name, member)
        except Exception:
            self._remove_modules(name)
            raise
        self.adapters_registry.configs[name] = cfg
        ref = host.reference()
        slotted: list[nn.Parameter] = []
        for _, module in self.adapter_modules(name):  # one walk: mode, device and dtype, slot parameters
            subs = list(module.modules())
            for m in subs:
                m.training = self.training  # new modules follow the model's train/eval mode (what train() sets)
            if not all(_placed_like(m, ref) for m in subs):  # a spare taken back usually is already
                module.to(device=ref.device, dtype=ref.dtype)
            slotted += _slot_parameters_of(subs)
        if host.stack_cache.slots.enabled:
            host.stack_cache.slots.place(slotted)
        if set_active:
            self.set_active_adapters(name)

    def _slot_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for _, module in self.adapter_modules(name) for p in _slot_parameters_of(module.modules())]

    def _remove_modules(self, name: str) -> None:
        host = self._host
        subs = [m for _, module in self.adapter_modules(name) for m in module.modules()]
        host.stack_cache.forget(p for m in subs for p in m._parameters.values() if p is not None)
        host.stack_cache.slots.release(_slot_parameters_of(subs))
        for room in METHODS:
            room.remove(host, name)

    def delete_adapter(self, name: str) -> None:
        if not self.has_adapter(name):
            raise ValueError(f"no adapter named {name!r}")
        self._remove_modules(name)
        reg = self.adapters_registry
        del reg.configs[name]
        if reg.active is not None and name in reg.active.flatten():
            reg.active = None

    # -- the model-wide cache of stacked adapter weights ---------------------------------------------
    def stack_cache_nbytes(self) -> int:
        """Bytes of stacked adapter weights the model holds for mixed batches (beyond the adapters themselves)."""
        return self._host.stack_cache.nbytes

    def set_stack_cache_limit(self, nbytes: int) -> None:
        """Bound the stacked-weight cache of all sites together to `nbytes` (default 64 MiB; 0 keeps nothing).

        Least recently used stacks are evicted at once and whenever a new one needs room. With adapter slots
        on, the same bound applies to the slot pools' free rows (stacks and free rows share it).
        """
        self._host.stack_cache.set_limit(nbytes)

    def enable_adapter_slots(self, enabled: bool = True) -> None:
        """Keep adapters loaded from now on in stacked per-shape slot pools (see methods.slots), so mixed
        batches gather their weights by slot index instead of stacking them per combination of adapters.

        It also keeps deleted adapters' modules as spares (methods.spares) that a later load of the same shape
        takes instead of building new ones. For serving: call it after the model has its final device and
        dtype. Adapters already loaded stay where they are.
        """
        self._host.stack_cache.slots.enabled = enabled
        self._host.stack_cache.spares.enabled = enabled
        if not enabled:
            self._host.stack_cache.spares.clear()

    def adapter_slot_stats(self) -> dict[str, int]:
        """The slot pools' size: pools, rows held, rows allocated, bytes (free rows included)."""
        slots = self._host.stack_cache.slots
        return {**slots.stats(), "nbytes": slots.nbytes, "free_nbytes": slots.free_nbytes}

    # -- activation and training -------------------------------------------------------------------
    def set_active_adapters(self, setup: Any) -> None:
        block = parse_composition(setup)
        if block is not None:
            validate_composition(block, self.adapter_methods())
            for room in METHODS:
                room.check_setup(self._host, block, None)
        self.adapters_registry.active = block

    @property
    def active_adapters(self) -> AdapterCompositionBlock | None:
        return self.adapters_registry.active

    def adapter_named_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(AdapterHub key, parameter) for every parameter of adapter `name`."""
        prefix = self._key_prefix()
        seen: set[int] = set()  # a parameter shared by several modules counts once, at its first place
        for path, module in self.adapter_modules(name):
            for key, param in module.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield f"{prefix}{path}.{key}", param

    def adapter_modules(self, name: str) -> Iterator[tuple[str, nn.Module]]:
        """(dotted path, module) of adapter `name` in every per-adapter container of the model.

        The containers are found once per model (the rooms make them all when they are wired) and a walk
        only looks `name` up in each, so its cost follows the backbone's size, not the number of adapters
        loaded (a server with a thousand adapters loads and unloads each in the same time).
        """
        yield from adapter_entries(self._containers(), name)

    def _containers(self) -> Containers:
        reg, root = self.adapters_registry, self.adapter_base
        if reg.containers is None or reg.containers[0] is not root:
            reg.containers = (root, tuple(adapter_containers(root)))
        return reg.containers[1]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for _, p in self.adapter_named_parameters(name)]

    def adapter_nbytes(self, name: str) -> int:
        return sum(p.numel() * p.element_size() for p in self.adapter_parameters(name))

    def freeze_model(self, freeze: bool = True) -> None:
        for p in self.adapter_base.parameters():
            p.requires_grad_(not freeze)

    def train_adapter(self, names: str | list[str] | AdapterCompositionBlock) -> None:
        """Freeze everything but the named adapters (and their heads); activate them and enter train mode."""
        block = parse_composition(names)
        if block is None:
            raise ValueError("train_adapter needs at least one adapter name")
        for p in self.parameters():
            p.requires_grad_(False)
        for name in block.flatten():
            if not self.has_adapter(name):
                raise ValueError(f"no adapter named {name!r}")
            members = self.adapters_registry.configs[name].methods()
            for key, p in self.adapter_named_parameters(name):
                if not any(room.fixed_parameter(m, key) for m in members for room in methods_for(m)):
                    p.requires_grad_(True)
            self._unfreeze_head(name)
        self.set_active_adapters(block)
        self.train()

    # -- heads: a model without prediction heads has none (AdapterModel overrides these) ------------
    def _unfreeze_head(self, name: str) -> None:
        """Make head `name` trainable (not parameters tied to the backbone)."""

    def _head_files(self, name: str) -> tuple[dict, dict] | None:
        """(head_config dict, head tensors) of head `name`, or None."""
        return None

    def _load_head_files(self, name: str, files: AdapterFiles) -> None:
        """Add head `name` from a folder's head files."""
        warnings.warn(f"{type(self).__name__} has no prediction heads; the head of {name!r} is not loaded",
                      stacklevel=3)

    # -- state dicts and files ---------------------------------------------------------------------
    def _key_prefix(self) -> str:
        """What AdapterHub puts before a base-model parameter's name in files: the base model's attribute
        name, or nothing for an encoder-decoder that is its own base model (T5ForConditionalGeneration)."""
        base = self.adapter_base
        if base is self and getattr(self.config, "is_encoder_decoder", False):
            return ""
        return f"{base.base_model_prefix}."

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        if not self.has_adapter(name):
            raise ValueError(f"no adapter named {name!r}")
        return {k: p.detach() for k, p in self.adapter_named_parameters(name)}

    def _adapter_meta(self, name: str) -> dict[str, Any]:
        conf = self.adapter_base.config
        return {
            "config": self.adapters_registry.configs[name].to_dict(),
            "hidden_size": int(conf.hidden_size),
            "model_type": conf.model_type,
            "model_name": public_model_name(conf),
            "model_class": self.adapters_registry.spec.adapter_model_class,
            "name": name,
            "version": FORMAT_VERSION,
        }

    def save_adapter(self, save_directory: str | os.PathLike[str], name: str, with_head: bool = True) -> None:
        head = self._head_files(name) if with_head else None
        write_adapter_dir(save_directory, self._adapter_meta(name), self.adapter_state_dict(name),
                          *(head if head else (None, None)))

    def _rename_key(self, key: str, old: str, new: str) -> str:
        parts = key.split(".")
        for i in range(len(parts) - 1):
            if parts[i] in _NAME_SLOTS and parts[i + 1] == old:
                parts[i + 1] = new
        return ".".join(parts)

    def _translate(self, files: AdapterFiles, name: str) -> dict[str, torch.Tensor]:
        prefix = self._key_prefix()
        foreign = f"{self.adapter_base.base_model_prefix}."
        out: dict[str, torch.Tensor] = {}
        for key, value in files.state.items():
            key = self._rename_key(key, files.name, name)
            if not prefix and key.startswith(foreign):
                key = key[len(foreign):]
            elif not key.startswith(prefix):
                key = prefix + key
            out[key] = value
        return out

    def _check_compatible(self, files: AdapterFiles) -> None:
        conf = self.adapter_base.config
        hidden = files.meta.get("hidden_size")
        if hidden is not None and int(hidden) != int(conf.hidden_size):
            raise ValueError(
                f"adapter was made for hidden_size={hidden}, this model has hidden_size={conf.hidden_size}"
            )

    def read_adapter_files(self, path: str | os.PathLike[str], allow_pickle: bool = False) -> AdapterFiles:
        """An AdapterHub or PEFT folder read and translated for this model, not loaded yet: `load_adapter` takes
        the result in place of the path. It touches no module, so it may run on another thread while this
        model runs a forward pass (a server reads the files of the adapters its queued requests need meanwhile).
        """
        if is_peft_dir(path):
            return self._from_peft(read_peft_dir(path))
        files = read_adapter_dir(path, allow_pickle=allow_pickle)
        state = files.state
        for room in METHODS:
            state = room.translate_state(state)
        return dataclasses.replace(files, state=state)

    def _from_peft(self, peft: PeftFiles) -> AdapterFiles:
        peft_type = str(peft.config.get("peft_type", "")).upper()
        for room in METHODS:
            if room.peft_type is not None and room.peft_type == peft_type:
                return room.from_peft(self._host, peft)
        known = " and ".join(room.peft_type for room in METHODS if room.peft_type is not None)
        raise ValueError(f"PEFT adapter type {peft_type or '(missing)'} is not supported ({known} are)")

    def load_adapter(
        self, adapter_name_or_path: str | os.PathLike[str] | AdapterFiles, load_as: str | None = None,
        with_head: bool = True, set_active: bool = False, allow_pickle: bool = False,
    ) -> str:
        """Load an AdapterHub or PEFT folder from a local path (or one `read_adapter_files` read); returns the
        adapter's name.

        Every tensor's key and shape is checked against the freshly built adapter; on any mismatch
        the adapter is removed again and a ValueError names the key.
        """
        files = (adapter_name_or_path if isinstance(adapter_name_or_path, AdapterFiles)
                 else self.read_adapter_files(adapter_name_or_path, allow_pickle))
        name = load_as or files.name
        self._check_compatible(files)
        state = self._translate(files, name)
        with self._host.stack_cache.spares.loading():  # every parameter is written next: spare modules may serve
            self.add_adapter(name, files.config)
        try:
            self._assign(name, state)
            if with_head and files.head_config is not None:
                self._load_head_files(name, files)
        except Exception:
            self.delete_adapter(name)
            raise
        if set_active:
            self.set_active_adapters(name)
        return name

    def _assign(self, name: str, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.adapter_named_parameters(name))
        unexpected = sorted(set(state) - set(params))
        if unexpected:
            raise ValueError(f"unexpected key(s) for this model: {', '.join(unexpected[:5])}")
        missing = sorted(set(params) - set(state))
        if missing:
            raise ValueError(f"missing key(s): {', '.join(missing[:5])}")
        for key, value in state.items():
            target = params[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"wrong shape for {key}: file has {tuple(value.shape)}, this model needs {tuple(target.shape)}"
                )
            if not value.dtype.is_floating_point:
                raise ValueError(f"{key} must be a floating-point tensor, got {value.dtype}")
        copy_into([(params[key], value) for key, value in state.items()])

    def _new_skeleton(self) -> AdapterModelMixin:
        """A fresh copy of this model's architecture with adapter support (built on the meta device by the caller)."""
        bases = type(self).__bases__
        config = copy.deepcopy(self.config)  # model construction may write to its config: not to ours
        if bases[0] is AdapterModelMixin and len(bases) == 2:  # a transformers model given adapters by init()
            return init(bases[1](config))
        return type(self)(config)

    # -- forward entry ------------------------------------------------------------------------------
    def resolve_setup(self) -> tuple[AdapterCompositionBlock | None, Any]:
        """The setup this thread's next forward uses: the innermost AdapterSetup, else the static one."""
        ctx = AdapterSetup.get_context()
        if ctx is not None:
            return ctx.adapter_setup, ctx.head_setup
        return self.adapters_registry.active, None

    def build_forward_context(self, batch_size: int, seq_len: int | None) -> ForwardContext:
        setup, head_setup = self.resolve_setup()
        if setup is not None:
            validate_composition(setup, self.adapter_methods(), batch_size=batch_size, seq_len=seq_len)
            if getattr(self.config, "is_encoder_decoder", False) and _has_split(setup):
                raise ValueError(f"{setup!r}: Split cuts the sequence, and an encoder-decoder's encoder and "
                                 "decoder sequences differ; it is not supported on encoder-decoders")
        compiled = compile_setup(setup, batch_size)
        if setup is not None:
            host = self._host
            for room in METHODS:
                room.check_setup(host, setup, compiled.plan)
        return ForwardContext(setup, compiled.plan, head_setup, compiled.replicate)

    def before_output_embeddings(self, hidden: torch.Tensor, start: int = 0, n_rows: int | None = None) -> torch.Tensor:
        """`hidden` (rows [start, ...) of the current forward's `n_rows`, default its own rows) as the rooms
        change it before an LM head's output embeddings; the setup is the running forward's, else this
        thread's."""
        ctx = ForwardContext.current()
        setup = ctx.setup if ctx is not None else self.resolve_setup()[0]
        if setup is None:
            return hidden
        rows = OutputRows(setup, int(hidden.shape[0]) if n_rows is None else n_rows, start)
        host = self._host
        for room in METHODS:
            hidden = room.before_output_embeddings(host, hidden, rows)
        return hidden


def _slot_parameters_of(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters these modules keep in slot pools (methods.slots), in order."""
    return [p for m in modules if callable(slotted := getattr(m, "slot_parameters", None)) for p in slotted()]


def _placed_like(module: nn.Module, ref: torch.Tensor) -> bool:
    """Whether `module`'s own tensors already have what `.to(device=ref.device, dtype=ref.dtype)` would give them
    (it casts floating-point tensors only), so the call can be skipped: a spare module taken back usually has."""
    for t in (*module._parameters.values(), *module._buffers.values()):
        if t is not None and (t.device != ref.device or (t.is_floating_point() and t.dtype != ref.dtype)):
            return False
    return True


def _has_split(block: AdapterCompositionBlock) -> bool:
    return isinstance(block, Split) or any(isinstance(c, AdapterCompositionBlock) and _has_split(c) for c in block)


def _enter_hook(model: AdapterModelMixin) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = model.adapters_registry.hook_state
        owned: list[Any] = state.__dict__.setdefault("owned", [])
        if ForwardContext.current() is not None:
            owned.append(None)
            return None
        ctx = model.build_forward_context(_batch_size(args, kwargs), _seq_len(args, kwargs))
        k = ctx.replicate
        if k > 1 and (kwargs.get("encoder_outputs") is not None or kwargs.get("past_key_values") is not None):
            raise ValueError(
                f"{ctx.setup!r}: Parallel replicates the whole batch, encoder included; it cannot start from given "
                "encoder outputs or a KV cache (generate() with Parallel is not supported: repeat the rows "
                "under BatchSplit instead)"
            )
        cm = forward_context(ctx)
        cm.__enter__()
        owned.append(cm)
        if k > 1:
            args = tuple(replicate_batch(a, k) for a in args)
            kwargs = {key: replicate_batch(v, k) if key in BATCH_KWARGS else v for key, v in kwargs.items()}
            return args, kwargs
        return None
    return hook


def _exit_hook(model: AdapterModelMixin) -> Any:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        owned: list[Any] = model.adapters_registry.hook_state.__dict__.setdefault("owned", [])
        if owned:
            cm = owned.pop()
            if cm is not None:
                cm.__exit__(None, None, None)
        return None
    return hook


def wire(model: AdapterModelMixin) -> None:
    """Let every method room attach to `model`'s base model, and install the forward entry hooks (once)."""
    base = model.base_model
    if hasattr(base, "_adapterserve_registry"):
        return
    spec = spec_for(base.config.model_type)
    layers: list[nn.Module] = []
    sites: list[tuple[Any, ...]] = []
    starts: list[int] = []
    paths: list[str] = []
    for group in spec.layer_groups():
        found = _find(base, group.layers)
        if found is None:  # e.g. T5EncoderModel has no decoder
            continue
        starts.append(len(layers))
        for j, layer in enumerate(found):
            layers.append(layer)
            sites.append(group.sites)
            paths.append(f"{group.layers}.{j}")
    if not layers:
        raise ValueError(f"{type(base).__name__} has none of the layer lists of {base.config.model_type!r} models")
    host = Host(base, spec, tuple(layers), layer_sites=tuple(sites), group_starts=tuple(starts),
                layer_paths=tuple(paths))
    for room in METHODS:
        room.wire(host)
    base._adapterserve_registry = Registry(spec, host)
    for entry in ("", *spec.entries):
        module = _find(base, entry)
        if module is not None:
            module.register_forward_pre_hook(_enter_hook(model), with_kwargs=True)
            module.register_forward_hook(_exit_hook(model), always_call=True)


def _find(base: nn.Module, path: str) -> Any:
    try:
        return get_path(base, path)
    except AttributeError:
        return None


def _output_embeddings_hook(model: AdapterModelMixin) -> Any:
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        return (model.before_output_embeddings(args[0]), *args[1:])
    return hook


def init(model: nn.Module) -> nn.Module:
    """Add adapter support to a transformers model in place (idempotent) and return it.

    A model with output embeddings (an LM head such as GPT-2's `lm_head`) gets the rooms'
    `before_output_embeddings` on that module's input.
    """
    if isinstance(model, AdapterModelMixin):
        return model
    cls = model.__class__
    model.__class__ = type(cls.__name__, (AdapterModelMixin, cls), {"__module__": cls.__module__})
    wire(model)
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if isinstance(output, nn.Module):
        output.register_forward_pre_hook(_output_embeddings_hook(model))
    return model


__all__ = ["BATCH_KWARGS", "AdapterModelMixin", "init", "replicate_batch", "wire"]
