"""Adapter method configurations: frozen, validated values that read and write AdapterHub's JSON.

Every config is a frozen dataclass. ``to_dict()`` gives exactly the ``"config"`` object AdapterHub
writes into ``adapter_config.json`` (bottleneck dicts carry no ``"architecture"`` key; prefix tuning
and LoRA dicts do; unions are ``{"architecture": "union", "configs": [...]}``), and
``AdapterConfigBase.from_dict`` reads it back, so files round-trip between the two libraries.

Config strings (``AdapterConfigBase.load``): a name such as ``"seq_bn"``, with optional overrides
in brackets (``"lora[r=4,alpha=16]"``, ``"seq_bn[leave_out=[0,1]]"``), joined into a union with
``"|"`` (``"prefix_tuning[bottleneck_size=800]|par_bn"``).

This module depends on the standard library only.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

__all__ = [
    "ADAPTER_CONFIG_NAMES",
    "ADAPTERFUSION_CONFIG_NAMES",
    "DEFAULT_ADAPTER_CONFIG",
    "DEFAULT_ADAPTERFUSION_CONFIG",
    "NON_LINEARITIES",
    "AdapterConfig",
    "AdapterConfigBase",
    "AdapterFusionConfig",
    "BnConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "ConfigUnion",
    "DoubleSeqBnConfig",
    "DynamicAdapterFusionConfig",
    "FrozenMap",
    "HoulsbyConfig",
    "IA3Config",
    "LoRAConfig",
    "MAMConfig",
    "ParBnConfig",
    "ParallelConfig",
    "PfeifferConfig",
    "PrefixTuningConfig",
    "SeqBnConfig",
    "StaticAdapterFusionConfig",
    "method_kinds",
    "method_name",
]

#: Activation names accepted for ``non_linearity`` (compared case-insensitively).
NON_LINEARITIES: frozenset[str] = frozenset(
    {"relu", "gelu", "gelu_new", "swish", "silu", "tanh", "sigmoid", "leakyrelu", "linear", "identity"}
)
DEFAULT_ADAPTER_CONFIG = "seq_bn"
DEFAULT_ADAPTERFUSION_CONFIG = "dynamic"

_UNSUPPORTED = "is not supported by adapterserve"


class FrozenMap(Mapping[str, Any]):
    """An immutable, hashable ``str``-keyed mapping (used for per-layer reduction factors and extras)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_data", dict(data or {}))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self._data)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("FrozenMap is immutable")


def _freeze(value: Any) -> Any:
    """Deep-freezes JSON-like data: dicts become FrozenMap, lists become tuples."""
    if isinstance(value, Mapping):
        return FrozenMap({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _to_json(value: Any) -> Any:
    """Turns frozen values back into JSON-like data: mappings become dicts, tuples become lists."""
    if isinstance(value, _FrozenConfig):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# Type checking of field values (configs come from untrusted JSON and strings, so check everything)
# ---------------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _matches(value: Any, hint: Any) -> bool:
    """True when ``value`` fits the (simple) type hint; ints count as floats, bools as neither."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, tuple) and all(_matches(v, args[0]) for v in value)
    if origin is Mapping or hint is Mapping:
        return isinstance(value, Mapping)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"unsupported type hint {hint!r}")  # a programming error, not bad input


def _hint_has(hint: Any, kind: type) -> bool:
    """True when ``kind`` (tuple or Mapping) appears among the hint's alternatives."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_hint_has(arg, kind) for arg in typing.get_args(hint))
    return typing.get_origin(hint) is kind or hint is kind


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


# ---------------------------------------------------------------------------------------------------
# Common base: frozen, value-compared, JSON round-tripping
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, kw_only=True)
class _FrozenConfig:
    """Shared machinery: normalisation and type checks, value equality, ``to_dict``/``replace``."""

    #: Keys found in a foreign file that no field knows (kept so a round trip preserves them).
    extra: Mapping[str, Any] = field(default_factory=FrozenMap, repr=False, compare=False)

    #: Whether ``to_dict`` writes the ``architecture`` class attribute (AdapterHub's layout).
    _writes_architecture: ClassVar[bool] = False
    architecture: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            hint = hints[f.name]
            if f.name == "extra":
                object.__setattr__(self, "extra", _freeze(value or {}))
                continue
            if isinstance(value, list) and _hint_has(hint, tuple):
                value = tuple(value)
            elif isinstance(value, Mapping) and not isinstance(value, FrozenMap) and _hint_has(hint, Mapping):
                value = FrozenMap({str(k): v for k, v in value.items()})
            object.__setattr__(self, f.name, value)
            if not _matches(value, hint):
                raise ValueError(
                    f"{type(self).__name__}.{f.name} must be {_type_name(hint)}, got {value!r} "
                    f"({type(value).__name__})"
                )
        self._validate()

    def _validate(self) -> None:
        """Checks ranges and unsupported features; overridden per method."""

    # -- errors ---------------------------------------------------------------------------------
    def _fail(self, name: str, reason: str) -> typing.NoReturn:
        raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r}: {reason}")

    def _check_range(
        self, name: str, low: float, high: float | None = None, *, high_open: bool = True
    ) -> None:
        value = getattr(self, name)
        if value is None:
            return
        too_high = high is not None and (value >= high if high_open else value > high)
        if value < low or too_high:
            bound = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
            self._fail(name, f"must be >= {low}{bound}")

    def _check_choice(self, name: str, choices: typing.Collection[str], *, lower: bool = False) -> None:
        value = getattr(self, name)
        probe = value.lower() if lower and isinstance(value, str) else value
        if probe not in choices:
            self._fail(name, f"must be one of {sorted(choices)}")

    def _check_leave_out(self) -> None:
        if any(i < 0 for i in getattr(self, "leave_out", ())):
            self._fail("leave_out", "layer indices must be >= 0")

    # -- values ---------------------------------------------------------------------------------
    def _field_items(self) -> tuple[tuple[str, Any], ...]:
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra")

    def _identity(self) -> tuple[Any, ...]:
        return (self.architecture, self._field_items())

    def __eq__(self, other: object) -> bool:
        # Value equality (like AdapterHub): SeqBnConfig() equals a BnConfig holding the same values.
        if not isinstance(other, _FrozenConfig):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object AdapterHub writes for this config (tuples as lists, extras appended)."""
        out: dict[str, Any] = {}
        if self._writes_architecture:
            out["architecture"] = self.architecture
        out.update((name, _to_json(value)) for name, value in self._field_items())
        out.update((k, _to_json(v)) for k, v in self.extra.items() if k not in out)
        return out

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied and validated; unknown names are a ValueError."""
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"{type(self).__name__} has no field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def _build(cls, data: Mapping[str, Any], strict: bool) -> Self:
        """Constructs ``cls`` from a dict, handling unknown keys (error, or kept in ``extra``)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        unknown = {str(k): v for k, v in data.items() if k not in names and k != "architecture"}
        if unknown:
            if strict:
                raise ValueError(f"{cls.__name__}: unknown key(s) {sorted(unknown)}")
            warnings.warn(
                f"{cls.__name__}: ignoring unknown key(s) {sorted(unknown)} (kept for writing back)",
                stacklevel=3,
            )
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in known
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"{cls.__name__}: missing required key(s) {missing}")
        return cls(**known, extra=unknown)


# ---------------------------------------------------------------------------------------------------
# Adapter configs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, kw_only=True)
class AdapterConfigBase(_FrozenConfig):
    """Base of every adapter method config; also the entry point for loading any config spec."""

    architecture: ClassVar[str | None] = None

    def methods(self) -> tuple[AdapterConfigBase, ...]:
        """The single-method configs this config consists of (a union's members, else ``(self,)``)."""
        return (self,)

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
        if arch is None or arch == "bottleneck":
            target: type[AdapterConfigBase] = BnConfig
        elif arch == "lora":
            target = IA3Config if data.get("composition_mode") == "scale" else LoRAConfig
        elif arch == "prefix_tuning":
            target = PrefixTuningConfig
        elif arch == "union":
            target = ConfigUnion
        else:
            raise ValueError(f"unknown or unsupported adapter architecture {arch!r}")
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
            config = _parse_config_string(spec)
        else:
            raise ValueError(f"cannot load an adapter config from {type(spec).__name__}: {spec!r}")
        if overrides:
            config = config.replace(**overrides)
        if not isinstance(config, cls):
            raise ValueError(f"{cls.__name__}.load: {spec!r} is a {type(config).__name__}")
        return config


@dataclass(frozen=True, eq=False, kw_only=True)
class BnConfig(AdapterConfigBase):
    """A bottleneck adapter: down-projection, activation, up-projection at mh/output locations.

    The AdapterHub-only keys (cross_adapter, inv_adapter, ...) are fields so our JSON equals theirs.
    """

    architecture: ClassVar[str | None] = "bottleneck"

    mh_adapter: bool
    output_adapter: bool
    reduction_factor: float | Mapping[str, float]
    non_linearity: str
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None
    cross_adapter: bool = False
    leave_out: tuple[int, ...] = ()
    dropout: float = 0.0
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: bool = True
    shared_W_phm: bool = False
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_c_init: str = "normal"
    phm_init_range: float = 0.0001
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    phm_rank: int = 1
    phm_bias: bool = True
    stochastic_depth: float = 0.0

    def _validate(self) -> None:
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            for key, value in rf.items():
                if key != "default" and not key.isdigit():
                    self._fail(
                        "reduction_factor", f"per-layer key {key!r} must be a layer index or 'default'"
                    )
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    self._fail("reduction_factor", f"value for {key!r} must be a number > 0")
        elif rf <= 0:
            self._fail("reduction_factor", "must be > 0")
        self._check_choice("non_linearity", NON_LINEARITIES, lower=True)
        self._check_choice("init_weights", ("bert", "mam_adapter", "houlsby"))
        if isinstance(self.residual_before_ln, str) and self.residual_before_ln != "post_add":
            self._fail("residual_before_ln", "must be a bool or 'post_add'")
        if isinstance(self.scaling, str):
            self._fail(
                "scaling", f"only a constant float scaling is supported; {self.scaling!r} {_UNSUPPORTED}"
            )
        if self.use_gating:
            self._fail("use_gating", f"adapter gating {_UNSUPPORTED}")
        if self.inv_adapter is not None:
            self._fail("inv_adapter", f"invertible adapters {_UNSUPPORTED}")
        if not (self.mh_adapter or self.output_adapter or self.cross_adapter):
            self._fail("mh_adapter", "at least one of mh_adapter, output_adapter, cross_adapter must be True")
        self._check_range("dropout", 0.0, 1.0)
        self._check_range("stochastic_depth", 0.0, 1.0)
        self._check_range("phm_dim", 1)
        self._check_range("phm_rank", 1)
        self._check_choice("phm_c_init", ("normal", "uniform"))
        self._check_choice("hypercomplex_nonlinearity", ("phm", "glorot-normal", "glorot-uniform", "normal"))
        self._check_leave_out()

    def reduction_factor_for(self, layer_idx: int) -> float:
        """The reduction factor of layer ``layer_idx`` (per-layer map entry, else its ``"default"``)."""
        rf = self.reduction_factor
        if not isinstance(rf, Mapping):
            return rf
        if str(layer_idx) in rf:
            return rf[str(layer_idx)]
        if "default" in rf:
            return rf["default"]
        raise ValueError(
            f"{type(self).__name__}.reduction_factor={rf!r} has no entry for layer {layer_idx} and no 'default'"
        )

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], strict: bool) -> AdapterConfigBase:
        config = cls._build(data, strict)
        if cls is BnConfig:
            # Give well-known layouts their named class (value equality makes this invisible to ==).
            named = _BN_CLASS_BY_NAME.get(method_name(config))
            if named is not None:
                return named(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        return config


@dataclass(frozen=True, eq=False, kw_only=True)
class SeqBnConfig(BnConfig):
    """Sequential bottleneck after the FFN (Pfeiffer et al., 2020) [``seq_bn``, ``pfeiffer``]."""

    original_ln_before: bool = True
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | Mapping[str, float] = 16


@dataclass(frozen=True, eq=False, kw_only=True)
class DoubleSeqBnConfig(BnConfig):
    """Bottlenecks after attention and after the FFN (Houlsby et al., 2019) [``double_seq_bn``]."""

    mh_adapter: bool = True
    output_adapter: bool = True
    non_linearity: str = "swish"
    reduction_factor: float | Mapping[str, float] = 16


@dataclass(frozen=True, eq=False, kw_only=True)
class ParBnConfig(BnConfig):
    """Parallel bottleneck beside the FFN, scaled by 4 (He et al., 2021) [``par_bn``, ``parallel``]."""

    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | Mapping[str, float] = 2
    init_weights: str = "mam_adapter"
    is_parallel: bool = True
    scaling: float | str = 4.0


@dataclass(frozen=True, eq=False, kw_only=True)
class CompacterConfig(DoubleSeqBnConfig):
    """DoubleSeqBn with PHM (Kronecker-factored) projections (Mahabadi et al., 2021) [``compacter``]."""

    phm_layer: bool = True
    reduction_factor: float | Mapping[str, float] = 32
    non_linearity: str = "gelu"


@dataclass(frozen=True, eq=False, kw_only=True)
class CompacterPlusPlusConfig(SeqBnConfig):
    """SeqBn with PHM projections (Mahabadi et al., 2021) [``compacter++``]."""

    phm_layer: bool = True
    reduction_factor: float | Mapping[str, float] = 32
    non_linearity: str = "gelu"


AdapterConfig = BnConfig
PfeifferConfig = SeqBnConfig
HoulsbyConfig = DoubleSeqBnConfig
ParallelConfig = ParBnConfig


@dataclass(frozen=True, eq=False, kw_only=True)
class PrefixTuningConfig(AdapterConfigBase):
    """Prefix tuning (Li & Liang, 2021): learned key/value prefixes per layer [``prefix_tuning``]."""

    architecture: ClassVar[str | None] = "prefix_tuning"
    _writes_architecture: ClassVar[bool] = True

    encoder_prefix: bool = True
    cross_prefix: bool = True
    leave_out: tuple[int, ...] = ()
    flat: bool = False
    prefix_length: int = 30
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    dropout: float = 0.0
    use_gating: bool = False
    shared_gating: bool = True
    init_weights_seed: int | None = None

    def _validate(self) -> None:
        self._check_range("prefix_length", 1)
        self._check_range("bottleneck_size", 1)
        self._check_range("dropout", 0.0, 1.0)
        self._check_choice("non_linearity", NON_LINEARITIES, lower=True)
        if self.use_gating:
            self._fail("use_gating", f"prefix gating {_UNSUPPORTED}")
        self._check_leave_out()


@dataclass(frozen=True, eq=False, kw_only=True)
class LoRAConfig(AdapterConfigBase):
    """Low-rank updates of attention/MLP weights (Hu et al., 2021) [``lora``]; scaling = alpha / r."""

    architecture: ClassVar[str | None] = "lora"
    _writes_architecture: ClassVar[bool] = True

    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: tuple[int, ...] = ()
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    attn_matrices: tuple[str, ...] = ("q", "v")
    composition_mode: str = "add"
    init_weights: str = "lora"
    init_weights_seed: int | None = None
    use_gating: bool = False
    use_dora: bool = False
    vera_d: float | None = None
    vera_b: float | None = None
    dtype: str | None = None

    @property
    def scaling(self) -> float:
        """The factor applied to B @ A: alpha / r."""
        return self.alpha / self.r

    def _validate(self) -> None:
        self._check_range("r", 1)
        if self.alpha <= 0:
            self._fail("alpha", "must be > 0")
        self._check_range("dropout", 0.0, 1.0)
        bad = [m for m in self.attn_matrices if m not in ("q", "k", "v", "o")]
        if bad:
            self._fail("attn_matrices", f"entries {bad} are not among 'q', 'k', 'v', 'o'")
        if len(set(self.attn_matrices)) != len(self.attn_matrices):
            self._fail("attn_matrices", "entries must be unique")
        self._check_choice("composition_mode", ("add", "scale"))
        if self.composition_mode == "scale" and self.r != 1:
            self._fail("r", "composition_mode='scale' (IA3) requires r=1")
        if self.init_weights == "vera":
            self._fail("init_weights", f"VeRA {_UNSUPPORTED}")
        self._check_choice("init_weights", ("lora", "bert", "ia3"))
        if self.use_gating:
            self._fail("use_gating", f"LoRA gating {_UNSUPPORTED}")
        if self.use_dora:
            self._fail("use_dora", f"DoRA {_UNSUPPORTED}")
        for name in ("vera_d", "vera_b"):
            if getattr(self, name) is not None:
                self._fail(name, f"VeRA {_UNSUPPORTED}")
        self._check_leave_out()


@dataclass(frozen=True, eq=False, kw_only=True)
class IA3Config(LoRAConfig):
    """(IA)^3 (Liu et al., 2022): learned vectors that scale k, v and the FFN input [``ia3``]."""

    intermediate_lora: bool = True
    r: int = 1
    alpha: float = 1
    attn_matrices: tuple[str, ...] = ("k", "v")
    composition_mode: str = "scale"
    init_weights: str = "ia3"


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
                if isinstance(a, BnConfig) and isinstance(b, BnConfig):
                    shared = _bn_locations(a) & _bn_locations(b)
                    if not shared:
                        continue
                    raise ValueError(
                        f"ConfigUnion: bottleneck members {j} ({method_name(b)}) and {i} ({method_name(a)}) "
                        f"both sit at {sorted(shared)}; bottlenecks in one union need disjoint locations"
                    )
                raise ValueError(
                    f"ConfigUnion: members {j} ({method_name(b)}) and {i} ({method_name(a)}) are both "
                    f"{a.architecture!r} configs; a union holds at most one per architecture"
                )

    def methods(self) -> tuple[AdapterConfigBase, ...]:
        return self.configs

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


class MAMConfig(ConfigUnion):
    """Mix-and-Match (He et al., 2021): prefix tuning (bottleneck 800) + parallel bottleneck [``mam``]."""

    def __init__(
        self,
        prefix_tuning: PrefixTuningConfig | None = None,
        adapter: BnConfig | None = None,
    ) -> None:
        prefix_tuning = (
            prefix_tuning if prefix_tuning is not None else PrefixTuningConfig(bottleneck_size=800)
        )
        adapter = adapter if adapter is not None else ParBnConfig()
        if not isinstance(prefix_tuning, PrefixTuningConfig):
            raise ValueError(f"MAMConfig.prefix_tuning must be a PrefixTuningConfig, got {prefix_tuning!r}")
        if not isinstance(adapter, BnConfig):
            raise ValueError(f"MAMConfig.adapter must be a BnConfig, got {adapter!r}")
        super().__init__(prefix_tuning, adapter)

    @property
    def prefix_tuning(self) -> PrefixTuningConfig:
        return typing.cast(PrefixTuningConfig, self.configs[0])

    @property
    def adapter(self) -> BnConfig:
        return typing.cast(BnConfig, self.configs[1])


def _bn_locations(config: BnConfig) -> set[str]:
    return {name for name in ("mh_adapter", "output_adapter", "cross_adapter") if getattr(config, name)}


def method_name(config: AdapterConfigBase) -> str:
    """A short label for a config, judged by its values (not its class).

    One of seq_bn, double_seq_bn, par_bn, compacter, compacter++, bottleneck, prefix_tuning,
    lora, ia3, mam (prefix tuning + one parallel bottleneck), union.
    """
    if isinstance(config, ConfigUnion):
        members = config.configs
        if (
            len(members) == 2
            and isinstance(members[0], PrefixTuningConfig)
            and isinstance(members[1], BnConfig)
            and members[1].is_parallel
        ):
            return "mam"
        return "union"
    if isinstance(config, PrefixTuningConfig):
        return "prefix_tuning"
    if isinstance(config, LoRAConfig):
        return "ia3" if config.composition_mode == "scale" else "lora"
    if isinstance(config, BnConfig):
        mh, out = config.mh_adapter, config.output_adapter
        if config.cross_adapter:
            return "bottleneck"
        if config.is_parallel:
            return "par_bn" if (out and not mh and not config.phm_layer) else "bottleneck"
        if mh and out:
            return "compacter" if config.phm_layer else "double_seq_bn"
        if out and config.original_ln_before:
            return "compacter++" if config.phm_layer else "seq_bn"
        return "bottleneck"
    raise ValueError(f"not an adapter config: {config!r}")


def method_kinds(config: AdapterConfigBase) -> frozenset[str]:
    """The method kinds a config holds: subsets of {"bottleneck", "prefix_tuning", "lora"} (IA3 is lora)."""
    return frozenset(typing.cast(str, c.architecture) for c in config.methods())


_BN_CLASS_BY_NAME: dict[str, type[BnConfig]] = {
    "seq_bn": SeqBnConfig,
    "double_seq_bn": DoubleSeqBnConfig,
    "par_bn": ParBnConfig,
    "compacter": CompacterConfig,
    "compacter++": CompacterPlusPlusConfig,
}

#: Config string names -> factories of their default config.
ADAPTER_CONFIG_NAMES: Mapping[str, Callable[[], AdapterConfigBase]] = types.MappingProxyType(
    {
        "seq_bn": SeqBnConfig,
        "double_seq_bn": DoubleSeqBnConfig,
        "par_bn": ParBnConfig,
        "compacter": CompacterConfig,
        "compacter++": CompacterPlusPlusConfig,
        "prefix_tuning": PrefixTuningConfig,
        "prefix_tuning_flat": lambda: PrefixTuningConfig(flat=True),
        "lora": LoRAConfig,
        "ia3": IA3Config,
        "mam": MAMConfig,
        # seed-era aliases
        "pfeiffer": SeqBnConfig,
        "houlsby": DoubleSeqBnConfig,
        "parallel": ParBnConfig,
    }
)


# ---------------------------------------------------------------------------------------------------
# Config strings: name[key=value,...]|name2[...]
# ---------------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"([A-Za-z0-9_+\-]+)\s*(?:\[(.*)\])?", re.DOTALL)
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT_RE = re.compile(r"[+-]?\d+")
_BARE_RE = re.compile(r"[A-Za-z0-9_.+\-]+")


def _split_top(text: str, sep: str, whole: str) -> list[str]:
    """Splits ``text`` on ``sep`` outside square brackets and quotes; unbalanced brackets raise."""
    parts, depth, start, quote = [], 0, 0, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"adapter config string {whole!r}: unbalanced ']' in {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"adapter config string {whole!r}: unbalanced '[' in {text!r}")
    if quote:
        raise ValueError(f"adapter config string {whole!r}: unterminated quote in {text!r}")
    parts.append(text[start:])
    return parts


def _parse_value(text: str, whole: str) -> Any:
    """Parses an override value: int, float, bool, None, [list], 'quoted' or bare string."""
    text = text.strip()
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"adapter config string {whole!r}: bad list value {text!r}")
        inner = text[1:-1].strip()
        if not inner:
            return []
        return [_parse_value(item, whole) for item in _split_top(inner, ",", whole)]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    if text in ("None", "none", "null"):
        return None
    if _INT_RE.fullmatch(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        pass
    if not _BARE_RE.fullmatch(text):
        raise ValueError(f"adapter config string {whole!r}: cannot parse value {text!r}")
    return text


def _parse_item(item: str, whole: str) -> AdapterConfigBase:
    """One ``name[overrides]`` part of a config string."""
    item = item.strip()
    match = _NAME_RE.fullmatch(item)
    if not item or match is None:
        raise ValueError(
            f"adapter config string {whole!r}: cannot parse {item!r} (expected name[key=value,...])"
        )
    name, body = match.group(1).lower(), match.group(2)
    factory = ADAPTER_CONFIG_NAMES.get(name)
    if factory is None:
        raise ValueError(
            f"adapter config string {whole!r}: unknown config name {name!r}; "
            f"known: {', '.join(sorted(ADAPTER_CONFIG_NAMES))}"
        )
    overrides: dict[str, Any] = {}
    if body is not None and body.strip():
        for pair in _split_top(body, ",", whole):
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq or not _KEY_RE.fullmatch(key):
                raise ValueError(
                    f"adapter config string {whole!r}: bad override {pair.strip()!r} in {item!r}"
                )
            if key in overrides:
                raise ValueError(f"adapter config string {whole!r}: {key!r} given twice in {item!r}")
            overrides[key] = _parse_value(value, whole)
    try:
        config = factory()
        return config.replace(**overrides) if overrides else config
    except ValueError as err:
        raise ValueError(f"adapter config string {whole!r}, part {item!r}: {err}") from None


def _parse_config_string(spec: str) -> AdapterConfigBase:
    if not spec.strip():
        raise ValueError("empty adapter config string")
    parts = [_parse_item(p, spec) for p in _split_top(spec, "|", spec)]
    if len(parts) == 1:
        return parts[0]
    try:
        return ConfigUnion(*parts)
    except ValueError as err:
        raise ValueError(f"adapter config string {spec!r}: {err}") from None


# ---------------------------------------------------------------------------------------------------
# AdapterFusion
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, kw_only=True)
class AdapterFusionConfig(_FrozenConfig):
    """AdapterFusion attention over bottleneck outputs (Pfeiffer et al., 2021); AdapterHub's fields."""

    key: bool
    query: bool
    value: bool
    query_before_ln: bool
    regularization: bool
    residual_before: bool
    temperature: bool
    value_before_softmax: bool
    value_initialized: bool | str
    dropout_prob: float | None

    def _validate(self) -> None:
        self._check_range("dropout_prob", 0.0, 1.0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], strict: bool = True) -> AdapterFusionConfig:
        """Reads an ``adapter_fusion_config.json`` ``"config"`` object (missing keys use ``cls``'s defaults)."""
        return cls._build(data, strict)

    @classmethod
    def load(
        cls, spec: AdapterFusionConfig | Mapping[str, Any] | str, **overrides: Any
    ) -> AdapterFusionConfig:
        """Resolves ``"dynamic"``, ``"static"``, a dict or a config object, then applies ``overrides``."""
        if isinstance(spec, AdapterFusionConfig):
            config = spec
        elif isinstance(spec, Mapping):
            config = cls.from_dict(spec)
        elif isinstance(spec, str):
            factory = ADAPTERFUSION_CONFIG_NAMES.get(spec.strip().lower())
            if factory is None:
                raise ValueError(
                    f"unknown AdapterFusion config name {spec!r}; known: {sorted(ADAPTERFUSION_CONFIG_NAMES)}"
                )
            config = factory()
        else:
            raise ValueError(f"cannot load an AdapterFusion config from {type(spec).__name__}: {spec!r}")
        return config.replace(**overrides) if overrides else config


@dataclass(frozen=True, eq=False, kw_only=True)
class DynamicAdapterFusionConfig(AdapterFusionConfig):
    """Fusion with a value matrix and regularisation [``dynamic``, the default]."""

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool | str = True
    dropout_prob: float | None = None


@dataclass(frozen=True, eq=False, kw_only=True)
class StaticAdapterFusionConfig(AdapterFusionConfig):
    """Fusion without a value matrix [``static``]."""

    key: bool = True
    query: bool = True
    value: bool = False
    query_before_ln: bool = False
    regularization: bool = False
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool | str = False
    dropout_prob: float | None = None


ADAPTERFUSION_CONFIG_NAMES: Mapping[str, Callable[[], AdapterFusionConfig]] = types.MappingProxyType(
    {"dynamic": DynamicAdapterFusionConfig, "static": StaticAdapterFusionConfig}
)
