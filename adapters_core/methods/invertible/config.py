"""Invertible adapter configs (MAD-X language adapters): a bottleneck config plus ``inv_adapter``.

As in AdapterHub, any bottleneck config may carry an invertible adapter (fields ``inv_adapter``, "nice" or
"glow", and ``inv_adapter_reduction_factor``, on BnConfig); this room makes those kinds acceptable, names
the layouts seq_bn_inv and double_seq_bn_inv, and defines their classes (NICE, reduction factor 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...configuration import register_config_names
from ..bottleneck.config import (
    BnConfig,
    DoubleSeqBnConfig,
    SeqBnConfig,
    register_inv_adapters,
    register_layout,
)

__all__ = [
    "DEFAULT_INV_REDUCTION_FACTOR", "GLOW_ATAN_FACTOR", "GLOW_CLAMP", "INV_KINDS", "DoubleSeqBnInvConfig",
    "InvertibleSpec", "SeqBnInvConfig", "check_invertible", "invertible_spec",
]

#: The coupling block types AdapterHub accepts for ``inv_adapter``.
INV_KINDS: tuple[str, ...] = ("nice", "glow")
#: AdapterHub's default ``inv_adapter_reduction_factor`` in SeqBnInvConfig / DoubleSeqBnInvConfig.
DEFAULT_INV_REDUCTION_FACTOR = 2
#: GLOW's soft clamp: a scale is exp(GLOW_CLAMP * GLOW_ATAN_FACTOR * atan(s / GLOW_CLAMP)).
GLOW_CLAMP = 5.0
#: AdapterHub writes 0.636 (about 2/pi, which bounds the scale to exp(+-clamp)); kept exactly.
GLOW_ATAN_FACTOR = 0.636


@dataclass(frozen=True)
class InvertibleSpec:
    """What the coupling block needs: its kind, the subnet reduction factor and the activation."""

    kind: str
    reduction_factor: float
    non_linearity: str


def check_invertible(config: BnConfig) -> None:
    """Refuse an ``inv_adapter`` without a usable ``inv_adapter_reduction_factor`` (ValueError)."""
    rf = config.inv_adapter_reduction_factor
    if config.inv_adapter is not None and (rf is None or rf <= 0):
        raise ValueError(
            f"{type(config).__name__}.inv_adapter_reduction_factor={rf!r}: must be a number > 0 when inv_adapter is set"
        )


def invertible_spec(config: BnConfig) -> InvertibleSpec | None:
    """The coupling block of a bottleneck config, or None when ``inv_adapter`` is None."""
    if config.inv_adapter is None:
        return None
    check_invertible(config)
    return InvertibleSpec(config.inv_adapter, float(config.inv_adapter_reduction_factor), config.non_linearity)


class _Checked:
    """Validates the invertible fields after the bottleneck's own checks (a mixin before the config class)."""

    def _validate(self) -> None:
        config: BnConfig = self  # type: ignore[assignment]
        if config.inv_adapter is not None:
            config._check_choice("inv_adapter", INV_KINDS)
        super()._validate()  # type: ignore[misc]
        check_invertible(config)


@dataclass(frozen=True, eq=False, kw_only=True)
class SeqBnInvConfig(_Checked, SeqBnConfig):
    """Pfeiffer bottleneck + NICE invertible adapter (MAD-X language adapter) [``seq_bn_inv``, ``pfeiffer+inv``]."""

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = DEFAULT_INV_REDUCTION_FACTOR


@dataclass(frozen=True, eq=False, kw_only=True)
class DoubleSeqBnInvConfig(_Checked, DoubleSeqBnConfig):
    """Houlsby bottlenecks + NICE invertible adapter [``double_seq_bn_inv``, ``houlsby+inv``]."""

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = DEFAULT_INV_REDUCTION_FACTOR


_INV_LABELS = {"seq_bn": "seq_bn_inv", "double_seq_bn": "double_seq_bn_inv"}


def _inv_label(config: BnConfig, label: str) -> str:
    return _INV_LABELS.get(label, label) if config.inv_adapter is not None else label


register_inv_adapters(*INV_KINDS)
register_layout(_inv_label, seq_bn_inv=SeqBnInvConfig, double_seq_bn_inv=DoubleSeqBnInvConfig)
register_config_names(
    seq_bn_inv=SeqBnInvConfig, double_seq_bn_inv=DoubleSeqBnInvConfig,
    **{"pfeiffer+inv": SeqBnInvConfig, "houlsby+inv": DoubleSeqBnInvConfig},
)
