"""Adapter method configurations: frozen, validated values that read and write AdapterHub's JSON.
Every config is a frozen dataclass whose ``to_dict()`` gives exactly the ``"config"`` object
AdapterHub writes into ``adapter_config.json`` (bottleneck dicts carry no ``"architecture"`` key;
prefix tuning and LoRA dicts do; unions are ``{"architecture": "union", "configs": [...]}``), and
``AdapterConfigBase.from_dict`` reads it back, so files round-trip between the two libraries;
``AdapterConfigBase.load`` also takes config strings such as ``"lora[r=4,alpha=16]"`` or
``"prefix_tuning[bottleneck_size=800]|par_bn"``. This module holds the method configs, unions,
the name table and ``method_name``/``method_kinds``; the shared frozen-config machinery lives in
``config_base``, the config-string grammar in ``config_strings`` and the AdapterFusion configs in
``fusion_config``, and every public name is re-exported here. Standard library only.
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
from .config_strings import _parse_config_string
from .fusion_config import (
    ADAPTERFUSION_CONFIG_NAMES,
    AdapterFusionConfig,
    DynamicAdapterFusionConfig,
    StaticAdapterFusionConfig,
)

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
