"""PrefixTuningConfig: learned key/value prefixes per layer (Li & Liang, 2021) [``prefix_tuning``, ``prefix_tuning_flat``]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...configuration import (
    NON_LINEARITIES,
    UNSUPPORTED,
    AdapterConfigBase,
    register_architecture,
    register_config_names,
)

__all__ = ["PrefixTuningConfig"]


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
            self._fail("use_gating", f"prefix gating {UNSUPPORTED}")
        self._check_leave_out()


register_architecture("prefix_tuning", PrefixTuningConfig)
register_config_names(prefix_tuning=PrefixTuningConfig, prefix_tuning_flat=lambda: PrefixTuningConfig(flat=True))
