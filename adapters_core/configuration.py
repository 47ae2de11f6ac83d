"""Adapter configs: the base of every method's config, unions of several methods, and the registry of method configs.

Every config is a frozen dataclass whose ``to_dict()`` gives exactly the ``"config"`` object AdapterHub
writes into ``adapter_config.json`` (bottleneck dicts carry no ``"architecture"`` key; prefix tuning and
LoRA dicts do; unions are ``{"architecture": "union", "configs": [...]}``), and
``AdapterConfigBase.from_dict`` reads it back, so files round-trip between the two libraries;
``AdapterConfigBase.load`` also takes config strings such as ``"lora[r=4,alpha=16]"`` or
``"prefix_tuning[bottleneck_size=800]|par_bn"`` (grammar in ``config_strings``). The method configs live in
their rooms (``methods/<method>/config.py``), which register their string names and AdapterHub
architectures here with ``register_config_names`` and ``register_architecture``; this module names no method.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .config_base import FrozenMap, _FrozenConfig, _to_json
from .config_strings import parse_config_string

__all__ = [
    "ADAPTER_CONFIG_NAMES",
    "DEFAULT_ADAPTER_CONFIG",
    "NON_LINEARITIES",
    "UNSUPPORTED",
    "AdapterConfigBase",
    "ConfigUnion",
    "FrozenMap",
    "method_kinds",
    "method_name",
    "register_architecture",
    "register_config_names",
]

#: Activation names accepted for ``non_linearity`` (compared case-insensitively).
NON_LINEARITIES: frozenset[str] = frozenset(
    {"relu", "gelu", "gelu_new", "swish", "silu", "tanh", "sigmoid", "leakyrelu", "linear", "identity"}
)
DEFAULT_ADAPTER_CONFIG = "seq_bn"

#: The end of every "this feature is refused" message.
UNSUPPORTED = "is not supported by adapterserve"

ConfigFactory = Callable[[], "AdapterConfigBase"]
_NAMES: dict[str, ConfigFactory] = {}
_ARCHITECTURES: dict[str, list[tuple[type[AdapterConfigBase], Callable[[Mapping[str, Any]], bool] | None]]] = {}

#: Config string names -> factories of their default config (filled by the method rooms).
ADAPTER_CONFIG_NAMES: Mapping[str, ConfigFactory] = types.MappingProxyType(_NAMES)


def register_config_names(**factories: ConfigFactory) -> None:
    """Make config string names (``"seq_bn"``, ...) resolve to these factories of default configs."""
    _NAMES.update(factories)


def register_architecture(
    architecture: str, cls: type[AdapterConfigBase], when: Callable[[Mapping[str, Any]], bool] | None = None
) -> None:
    """Read AdapterHub dicts of ``architecture`` as ``cls`` (only those for which ``when`` holds, if given).

    The latest registration whose ``when`` accepts a dict wins, so a variant (IA3 for ``"lora"``) registers
    after its base class.
    """
    _ARCHITECTURES.setdefault(architecture, []).append((cls, when))


def _class_for(data: Mapping[str, Any]) -> type[AdapterConfigBase]:
    arch = data.get("architecture")
    for cls, when in reversed(_ARCHITECTURES.get("bottleneck" if arch is None else str(arch), [])):
        if when is None or when(data):
            return cls
    raise ValueError(f"unknown or unsupported adapter architecture {arch!r}")


# ---------------------------------------------------------------------------------------------------
# The base of every method config
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, kw_only=True)
class AdapterConfigBase(_FrozenConfig):
    """Base of every adapter method config; also the entry point for loading any config spec."""

    architecture: ClassVar[str | None] = None

    def methods(self) -> tuple[AdapterConfigBase, ...]:
        """The single-method configs this config consists of (a union's members, else ``(self,)``)."""
        return (self,)

    def method_label(self) -> str:
        """A short label judged by the config's values (see ``method_name``)."""
        return str(self.architecture)

    def locations(self) -> frozenset[str] | None:
        """Where in a layer the config places modules, when two configs of one architecture may share a
        union by sitting apart (bottlenecks); None: one config per architecture."""
        return None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], strict: bool = True) -> AdapterConfigBase:
        """Reads an AdapterHub ``"config"`` object, choosing the class from ``"architecture"``.

        ``strict=False`` is for foreign files: unknown keys are kept in ``extra`` and warned about.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"an adapter config must be a JSON object, got {type(data).__name__}")
        arch = data.get("architecture")
        if cls is not AdapterConfigBase and "architecture" not in data:
            return cls._from_dict(data, strict)  # a partial dict read by a concrete class
        target = _class_for(data)
        if cls is not AdapterConfigBase and not issubclass(target, cls) and not issubclass(cls, target):
            raise ValueError(f"{cls.__name__}.from_dict got a config of architecture {arch!r}")
        if issubclass(cls, target):
            target = cls  # called on a concrete class: its defaults fill missing keys
        return target._from_dict(data, strict)

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], strict: bool) -> AdapterConfigBase:
        return cls._build(data, strict)

    @classmethod
    def load(cls, spec: AdapterConfigBase | Mapping[str, Any] | str, **overrides: Any) -> AdapterConfigBase:
        """Resolves a config object, a dict or a config string, then applies ``overrides``."""
        if isinstance(spec, AdapterConfigBase):
            config = spec
        elif isinstance(spec, Mapping):
            config = AdapterConfigBase.from_dict(spec)
        elif isinstance(spec, str):
            config = _from_string(spec)
        else:
            raise ValueError(f"cannot load an adapter config from {type(spec).__name__}: {spec!r}")
        if overrides:
            config = config.replace(**overrides)
        if not isinstance(config, cls):
            raise ValueError(f"{cls.__name__}.load: {spec!r} is a {type(config).__name__}")
        return config


def _from_string(spec: str) -> AdapterConfigBase:
    """The config a config string names (a union when it has several ``|``-separated parts)."""
    configs = []
    for part in parse_config_string(spec):
        factory = _NAMES.get(part.name)
        if factory is None:
            raise ValueError(
                f"adapter config string {spec!r}: unknown config name {part.name!r}; "
                f"known: {', '.join(sorted(_NAMES))}"
            )
        try:
            config = factory()
            configs.append(config.replace(**part.overrides) if part.overrides else config)
        except ValueError as err:
            raise ValueError(f"adapter config string {spec!r}, part {part.text!r}: {err}") from None
    if len(configs) == 1:
        return configs[0]
    try:
        return ConfigUnion(*configs)
    except ValueError as err:
        raise ValueError(f"adapter config string {spec!r}: {err}") from None


# ---------------------------------------------------------------------------------------------------
# Unions
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, init=False)
class ConfigUnion(AdapterConfigBase):
    """Several methods under one adapter name; nested unions are flattened.

    At most one config per architecture, except bottlenecks at disjoint locations (e.g. one at
    ``mh_adapter`` and one at ``output_adapter``). Stricter than AdapterHub, which skips the
    check when a ``leave_out`` is set: two same-kind modules under one name cannot be stored apart.
    """

    architecture: ClassVar[str | None] = "union"
    _writes_architecture: ClassVar[bool] = True

    configs: tuple[AdapterConfigBase, ...]

    def __init__(self, *configs: AdapterConfigBase, extra: Mapping[str, Any] | None = None) -> None:
        flat: list[AdapterConfigBase] = []
        for config in configs:
            if not isinstance(config, AdapterConfigBase):
                raise ValueError(f"ConfigUnion members must be adapter configs, got {config!r}")
            flat.extend(config.methods())
        object.__setattr__(self, "configs", tuple(flat))
        object.__setattr__(self, "extra", extra or FrozenMap())
        self.__post_init__()

    def _validate(self) -> None:
        if not self.configs:
            raise ValueError("ConfigUnion needs at least one config")
        for i, a in enumerate(self.configs):
            for j, b in enumerate(self.configs[:i]):
                if a.architecture != b.architecture:
                    continue
                where_a, where_b = a.locations(), b.locations()
                if where_a is not None and where_b is not None:
                    shared = where_a & where_b
                    if not shared:
                        continue
                    raise ValueError(
                        f"ConfigUnion: {a.architecture} members {j} ({method_name(b)}) and {i} ({method_name(a)}) "
                        f"both sit at {sorted(shared)}; {a.architecture}s in one union need disjoint locations"
                    )
                raise ValueError(
                    f"ConfigUnion: members {j} ({method_name(b)}) and {i} ({method_name(a)}) are both "
                    f"{a.architecture!r} configs; a union holds at most one per architecture"
                )

    def methods(self) -> tuple[AdapterConfigBase, ...]:
        return self.configs

    def method_label(self) -> str:
        """``"mam"`` for prefix tuning followed by one parallel bottleneck, else ``"union"``."""
        members = self.configs
        if (
            len(members) == 2
            and members[0].architecture == "prefix_tuning"
            and members[1].architecture == "bottleneck"
            and getattr(members[1], "is_parallel", False)
        ):
            return "mam"
        return "union"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.configs))})"

    def _identity(self) -> tuple[Any, ...]:
        return ("union", tuple(c._identity() for c in self.configs))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": "union", "configs": [c.to_dict() for c in self.configs]}
        out.update((k, _to_json(v)) for k, v in self.extra.items() if k not in out)
        return out

    def replace(self, **changes: Any) -> ConfigUnion:
        """Applies each change to the members that have that field; a field none has is an error."""
        unknown = sorted(
            k for k in changes if not any(k in {f.name for f in dataclasses.fields(c)} for c in self.configs)
        )
        if unknown:
            raise ValueError(f"no member of {self!r} has field(s) {unknown}")
        members = []
        for c in self.configs:
            names = {f.name for f in dataclasses.fields(c)} - {"extra"}
            members.append(c.replace(**{k: v for k, v in changes.items() if k in names}))
        return ConfigUnion(*members, extra=self.extra)

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], strict: bool) -> AdapterConfigBase:
        configs = data.get("configs")
        if not isinstance(configs, list | tuple):
            raise ValueError("a union config needs a 'configs' list")
        unknown = {k: v for k, v in data.items() if k not in ("architecture", "configs")}
        if unknown:
            if strict:
                raise ValueError(f"ConfigUnion: unknown key(s) {sorted(unknown)}")
            warnings.warn(f"ConfigUnion: ignoring unknown key(s) {sorted(unknown)}", stacklevel=3)
        members = [AdapterConfigBase.from_dict(c, strict=strict) for c in configs]
        return ConfigUnion(*members, extra=unknown)


register_architecture("union", ConfigUnion)


def method_name(config: AdapterConfigBase) -> str:
    """A short label for a config, judged by its values (not its class).

    One of seq_bn, double_seq_bn, par_bn, compacter, compacter++, bottleneck, prefix_tuning,
    lora, ia3, mam (prefix tuning + one parallel bottleneck), union.
    """
    if not isinstance(config, AdapterConfigBase):
        raise ValueError(f"not an adapter config: {config!r}")
    return config.method_label()


def method_kinds(config: AdapterConfigBase) -> frozenset[str]:
    """The method kinds a config holds: subsets of {"bottleneck", "prefix_tuning", "lora"} (IA3 is lora)."""
    return frozenset(typing.cast(str, c.architecture) for c in config.methods())
