"""Invertible adapter configs (MAD-X language adapters): a bottleneck config plus ``inv_adapter``.

AdapterHub has no config class of its own for invertible adapters: the two fields ``inv_adapter``
("nice" or "glow") and ``inv_adapter_reduction_factor`` sit on every bottleneck config (BnConfig), and
``SeqBnInvConfig`` / ``DoubleSeqBnInvConfig`` subclass ``SeqBnConfig`` / ``DoubleSeqBnConfig`` with
``inv_adapter="nice"`` and ``inv_adapter_reduction_factor=2``. The classes here do the same against
``adapters_core.configuration``, whose ``BnConfig`` today refuses ``inv_adapter``: they validate their
bottleneck part by building the plain bottleneck config (``bottleneck_part()``), so that refusal stays in
force for every other class. ``BnInvConfig`` is the same for any bottleneck layout (AdapterHub lets any
BnConfig carry an invertible adapter).

Not yet registered: ``AdapterConfigBase.from_dict`` still builds a plain BnConfig (and fails) for a file
whose config has ``inv_adapter`` set; ``CONFIG_NAMES`` and ``config_class_for`` are what the registry
line and the from_dict dispatch will use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ...configuration import BnConfig, DoubleSeqBnConfig, SeqBnConfig

#: The coupling block types AdapterHub accepts for ``inv_adapter``.
INV_KINDS: tuple[str, ...] = ("nice", "glow")
#: AdapterHub's default ``inv_adapter_reduction_factor`` in SeqBnInvConfig / DoubleSeqBnInvConfig.
DEFAULT_INV_REDUCTION_FACTOR = 2
#: GLOW's soft clamp: a scale is exp(GLOW_CLAMP * GLOW_ATAN_FACTOR * atan(s / GLOW_CLAMP)).
GLOW_CLAMP = 5.0
#: AdapterHub writes 0.636 (about 2/pi, which bounds the scale to exp(+-clamp)); kept exactly.
GLOW_ATAN_FACTOR = 0.636
#: The config fields that belong to the invertible adapter.
INV_FIELDS: tuple[str, ...] = ("inv_adapter", "inv_adapter_reduction_factor")


@dataclass(frozen=True)
class InvertibleSpec:
    """What the coupling block needs: its kind, the subnet reduction factor and the activation."""

    kind: str
    reduction_factor: float
    non_linearity: str


class _InvertibleBn:
    """Validation and splitting shared by the config classes below (a mixin before the bottleneck class)."""

    bottleneck_class: ClassVar[type[BnConfig]] = BnConfig

    def _validate(self) -> None:
        kind = self.inv_adapter  # type: ignore[attr-defined]
        rf = self.inv_adapter_reduction_factor  # type: ignore[attr-defined]
        if kind is not None:
            self._check_choice("inv_adapter", INV_KINDS)  # type: ignore[attr-defined]
            if rf is None or rf <= 0:
                self._fail("inv_adapter_reduction_factor", "must be a number > 0 when inv_adapter is set")  # type: ignore[attr-defined]
        try:
            self.bottleneck_part()
        except ValueError as exc:
            raise ValueError(str(exc).replace(self.bottleneck_class.__name__, type(self).__name__, 1)) from None

    def bottleneck_part(self) -> BnConfig:
        """The same config without the invertible adapter, as the bottleneck class this one extends."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in INV_FIELDS}  # type: ignore[arg-type]
        values.update(inv_adapter=None, inv_adapter_reduction_factor=None)
        return self.bottleneck_class(**values)

    def invertible_spec(self) -> InvertibleSpec | None:
        """The coupling block of this config, or None when ``inv_adapter`` is None."""
        kind = self.inv_adapter  # type: ignore[attr-defined]
        if kind is None:
            return None
        return InvertibleSpec(kind, float(self.inv_adapter_reduction_factor), self.non_linearity)  # type: ignore[attr-defined]


@dataclass(frozen=True, eq=False, kw_only=True)
class BnInvConfig(_InvertibleBn, BnConfig):
    """Any bottleneck layout with an invertible adapter on the embedding output."""

    bottleneck_class: ClassVar[type[BnConfig]] = BnConfig


@dataclass(frozen=True, eq=False, kw_only=True)
class SeqBnInvConfig(_InvertibleBn, SeqBnConfig):
    """Pfeiffer bottleneck + NICE invertible adapter (MAD-X language adapter) [``seq_bn_inv``, ``pfeiffer+inv``]."""

    bottleneck_class: ClassVar[type[BnConfig]] = SeqBnConfig

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = DEFAULT_INV_REDUCTION_FACTOR


@dataclass(frozen=True, eq=False, kw_only=True)
class DoubleSeqBnInvConfig(_InvertibleBn, DoubleSeqBnConfig):
    """Houlsby bottlenecks + NICE invertible adapter [``double_seq_bn_inv``, ``houlsby+inv``]."""

    bottleneck_class: ClassVar[type[BnConfig]] = DoubleSeqBnConfig

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = DEFAULT_INV_REDUCTION_FACTOR


#: Config string names (AdapterHub's, including its deprecated "+inv" spellings) -> default configs.
CONFIG_NAMES: Mapping[str, type[BnConfig]] = {
    "seq_bn_inv": SeqBnInvConfig,
    "double_seq_bn_inv": DoubleSeqBnInvConfig,
    "pfeiffer+inv": SeqBnInvConfig,
    "houlsby+inv": DoubleSeqBnInvConfig,
}


def config_class_for(bottleneck: BnConfig) -> type[BnConfig]:
    """The invertible class for a bottleneck layout: SeqBnInv/DoubleSeqBnInv by value, else BnInvConfig."""
    for cls in (SeqBnInvConfig, DoubleSeqBnInvConfig):
        if bottleneck == cls.bottleneck_class():
            return cls
    return BnInvConfig


def method_label(config: BnConfig) -> str | None:
    """The method label of a config with an invertible adapter (seq_bn_inv, double_seq_bn_inv or
    bottleneck_inv), None without one."""
    if config.inv_adapter is None or not isinstance(config, _InvertibleBn):
        return None
    cls = config_class_for(config.bottleneck_part())
    return {SeqBnInvConfig: "seq_bn_inv", DoubleSeqBnInvConfig: "double_seq_bn_inv"}.get(cls, "bottleneck_inv")


def upgrade_legacy_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """adapter-transformers v1 nested ``"invertible_adapter": {"block_type", "reduction_factor"}`` -> the
    two flat fields, as AdapterHub's BnConfig.__setattr__ does when it reads an old file."""
    out = dict(data)
    legacy = out.pop("invertible_adapter", None)
    if isinstance(legacy, Mapping) and legacy:
        out["inv_adapter"] = legacy.get("block_type")
        out["inv_adapter_reduction_factor"] = legacy.get("reduction_factor")
    return out


__all__ = [
    "CONFIG_NAMES",
    "DEFAULT_INV_REDUCTION_FACTOR",
    "GLOW_ATAN_FACTOR",
    "GLOW_CLAMP",
    "INV_FIELDS",
    "INV_KINDS",
    "BnInvConfig",
    "DoubleSeqBnInvConfig",
    "InvertibleSpec",
    "SeqBnInvConfig",
    "config_class_for",
    "method_label",
    "upgrade_legacy_config",
]
