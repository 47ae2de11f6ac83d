"""Bottleneck adapter configs: BnConfig and its layouts seq_bn, double_seq_bn and par_bn (with seed-era aliases).

``BnConfig`` holds every field AdapterHub writes for a bottleneck (the PHM fields of Compacter included,
so our JSON equals theirs). A layout is named by its values (`bottleneck_label`); other rooms that refine
a bottleneck (Compacter) add a naming rule and their named classes with `register_layout`; a room that
builds invertible adapters makes ``inv_adapter`` values acceptable with `register_inv_adapters`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ...configuration import (
    NON_LINEARITIES,
    UNSUPPORTED,
    AdapterConfigBase,
    register_architecture,
    register_config_names,
)

__all__ = [
    "AdapterConfig", "BnConfig", "DoubleSeqBnConfig", "HoulsbyConfig", "ParBnConfig", "ParallelConfig",
    "PfeifferConfig", "SeqBnConfig", "bottleneck_label", "register_inv_adapters", "register_layout",
]

#: The layer locations a bottleneck can sit at (BnConfig's boolean fields of the same names).
LOCATIONS = ("mh_adapter", "output_adapter", "cross_adapter")

#: The ``inv_adapter`` kinds a room builds; any other value is refused.
_INV_ADAPTERS: set[str] = set()


def register_inv_adapters(*kinds: str) -> None:
    """Accept these ``inv_adapter`` values ("nice", "glow"): called by the room that builds them."""
    _INV_ADAPTERS.update(kinds)


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
                "scaling", f"only a constant float scaling is supported; {self.scaling!r} {UNSUPPORTED}"
            )
        if self.use_gating:
            self._fail("use_gating", f"adapter gating {UNSUPPORTED}")
        if self.inv_adapter is not None and self.inv_adapter not in _INV_ADAPTERS:
            self._fail("inv_adapter", f"invertible adapters {UNSUPPORTED}")
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

    def method_label(self) -> str:
        return bottleneck_label(self)

    def locations(self) -> frozenset[str]:
        return frozenset(name for name in LOCATIONS if getattr(self, name))

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], strict: bool) -> AdapterConfigBase:
        config = cls._build(data, strict)
        if cls is BnConfig:
            # Give well-known layouts their named class (value equality makes this invisible to ==).
            named = _NAMED.get(bottleneck_label(config))
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


AdapterConfig = BnConfig
PfeifferConfig = SeqBnConfig
HoulsbyConfig = DoubleSeqBnConfig
ParallelConfig = ParBnConfig

LabelRule = Callable[[BnConfig, str], str]
_LABEL_RULES: list[LabelRule] = []
_NAMED: dict[str, type[BnConfig]] = {}


def register_layout(rule: LabelRule | None = None, **named: type[BnConfig]) -> None:
    """Let a room name bottleneck layouts: `rule(config, label)` refines the label of a config, and `named`
    maps labels to the classes `BnConfig.from_dict` returns for them."""
    if rule is not None:
        _LABEL_RULES.append(rule)
    _NAMED.update(named)


def _layout(config: BnConfig) -> str:
    mh, out = config.mh_adapter, config.output_adapter
    if config.cross_adapter:
        return "bottleneck"
    if config.is_parallel:
        return "par_bn" if out and not mh else "bottleneck"
    if mh and out:
        return "double_seq_bn"
    if out and config.original_ln_before:
        return "seq_bn"
    return "bottleneck"


def bottleneck_label(config: BnConfig) -> str:
    """seq_bn, double_seq_bn, par_bn or bottleneck, as refined by the registered rules (compacter, ...)."""
    label = _layout(config)
    for rule in _LABEL_RULES:
        label = rule(config, label)
    return label


register_layout(seq_bn=SeqBnConfig, double_seq_bn=DoubleSeqBnConfig, par_bn=ParBnConfig)
register_architecture("bottleneck", BnConfig)
register_config_names(
    seq_bn=SeqBnConfig, double_seq_bn=DoubleSeqBnConfig, par_bn=ParBnConfig,
    pfeiffer=SeqBnConfig, houlsby=DoubleSeqBnConfig, parallel=ParBnConfig,
)
