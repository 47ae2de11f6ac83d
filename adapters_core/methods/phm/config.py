"""Compacter configs: bottlenecks whose projections are PHM layers (Mahabadi et al., 2021) [``compacter``, ``compacter++``].

A Compacter is any bottleneck with ``phm_layer=True``; this room names those layouts (compacter for
double_seq_bn, compacter++ for seq_bn, plain bottleneck otherwise) and gives them their classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ...configuration import register_config_names
from ..bottleneck.config import BnConfig, DoubleSeqBnConfig, SeqBnConfig, register_layout

__all__ = ["CompacterConfig", "CompacterPlusPlusConfig"]


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


_PHM_LABELS = {"double_seq_bn": "compacter", "seq_bn": "compacter++"}


def _phm_label(config: BnConfig, label: str) -> str:
    return _PHM_LABELS.get(label, "bottleneck") if config.phm_layer else label


register_layout(_phm_label, compacter=CompacterConfig, **{"compacter++": CompacterPlusPlusConfig})
register_config_names(compacter=CompacterConfig, **{"compacter++": CompacterPlusPlusConfig})
