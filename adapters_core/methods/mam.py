"""MAMConfig: Mix-and-Match (He et al., 2021), the union preset of two rooms' configs [``mam``]."""

from __future__ import annotations

import typing

from ..configuration import ConfigUnion, register_config_names
from .bottleneck.config import BnConfig, ParBnConfig
from .prefix_tuning.config import PrefixTuningConfig

__all__ = ["MAMConfig"]


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


register_config_names(mam=MAMConfig)
