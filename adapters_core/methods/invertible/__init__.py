"""Invertible adapters (MAD-X language adapters): NICE/GLOW coupling blocks on the embedding output,
applied inversely before an LM head's output embedding. See config, layer, apply and keys."""

from .apply import InvertibleRouting, apply_invertible, first_adapters
from .config import (
    CONFIG_NAMES,
    BnInvConfig,
    DoubleSeqBnInvConfig,
    InvertibleSpec,
    SeqBnInvConfig,
)
from .layer import GLOWCouplingBlock, InvertibleAdapter, NICECouplingBlock, build_invertible

__all__ = [
    "CONFIG_NAMES",
    "BnInvConfig",
    "DoubleSeqBnInvConfig",
    "GLOWCouplingBlock",
    "InvertibleAdapter",
    "InvertibleRouting",
    "InvertibleSpec",
    "NICECouplingBlock",
    "SeqBnInvConfig",
    "apply_invertible",
    "build_invertible",
    "first_adapters",
]
