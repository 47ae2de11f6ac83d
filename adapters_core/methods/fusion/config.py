"""AdapterFusion configs: AdapterHub's fusion fields and the ``dynamic`` and ``static`` presets.

``AdapterFusionConfig`` holds AdapterHub's fusion fields (key/query/value projections,
regularisation, temperature, ...) and reads and writes the ``"config"`` object of
``adapter_fusion_config.json``; ``DynamicAdapterFusionConfig`` (``"dynamic"``, the default) and
``StaticAdapterFusionConfig`` (``"static"``) give the two named presets, listed in
``ADAPTERFUSION_CONFIG_NAMES``. Depends on ``config_base`` only (no torch).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ...config_base import _FrozenConfig

__all__ = [
    "ADAPTERFUSION_CONFIG_NAMES",
    "AdapterFusionConfig",
    "DynamicAdapterFusionConfig",
    "StaticAdapterFusionConfig",
]


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
