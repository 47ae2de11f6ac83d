"""The coupling blocks of invertible adapters: NICE (additive) and GLOW (affine), ``forward(x, rev=False)``.

Both split the last dimension into x1 = x[..., :d1] and x2 = x[..., d1:] with d1 = d // 2, d2 = d - d1, and
use subnets ``Sequential(Linear(n, int(n // r)), act, Linear(int(n // r), m))`` (r: inv_adapter_reduction_factor,
act: the config's non_linearity), so parameters are named ``F.0.weight``, ``F.2.bias``, ``s1.0.weight`` ...
exactly as in AdapterHub's files.

NICE (F: d2 -> d1, G: d1 -> d2):
    forward  y1 = x1 + F(x2);   y2 = x2 + G(y1)
    inverse  x2 = y2 - G(y1);   x1 = y1 - F(x2)
GLOW (s1: d1 -> 2*d2, s2: d2 -> 2*d1; e(s) = exp(c * 0.636 * atan(s / c)), c = 5):
    forward  [a2, b2] = s2(x2);  y1 = e(a2) * x1 + b2;  [a1, b1] = s1(y1);  y2 = e(a1) * x2 + b1
    inverse  [a1, b1] = s1(y1);  x2 = (y2 - b1) / e(a1); [a2, b2] = s2(x2);  x1 = (y1 - b2) / e(a2)
with [a, b] the first and second part of a subnet's output along the last dimension.

GLOW deviates from AdapterHub's code on purpose: its forward uses the two halves themselves as (a2, b2)
instead of s2(x2), splits subnet outputs along dim 1 (the sequence) instead of the features, and returns a
list, so on (batch, seq, hidden) states it raises a shape error in both directions. The math above is the
GLOW coupling (FrEIA's, which AdapterHub's copies) that its inverse half implements; parameter names and
shapes are AdapterHub's, so its files load unchanged.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..activations import Activation
from .config import GLOW_ATAN_FACTOR, GLOW_CLAMP, InvertibleSpec


def subnet(dims_in: int, dims_out: int, non_linearity: str, reduction_factor: float) -> nn.Sequential:
    """AdapterHub's coupling subnet: Linear(dims_in, int(dims_in // r)) -> act -> Linear(..., dims_out)."""
    hidden = int(dims_in // reduction_factor)
    if hidden < 1:
        raise ValueError(
            f"inv_adapter_reduction_factor={reduction_factor} leaves no units for a subnet of width {dims_in}"
        )
    return nn.Sequential(nn.Linear(dims_in, hidden), Activation(non_linearity), nn.Linear(hidden, dims_out))


def init_bert_weights(module: nn.Module) -> None:
    """AdapterHub's initialisation of a new invertible adapter: Linear weights N(0, 0.02), biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class InvertibleAdapter(nn.Module):
    """A coupling block over the last dimension of width ``dims``; ``forward(x, rev=True)`` inverts it."""

    kind: ClassVar[str] = ""

    def __init__(self, dims: int):
        super().__init__()
        if dims < 2:
            raise ValueError(f"an invertible adapter needs a width of at least 2, got {dims}")
        self.dims = dims
        self.split_len1 = dims // 2
        self.split_len2 = dims - dims // 2

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.dims:
            raise ValueError(f"{type(self).__name__} of width {self.dims} got inputs of width {x.shape[-1]}")
        return x[..., : self.split_len1], x[..., self.split_len1 :]

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class NICECouplingBlock(InvertibleAdapter):
    """Additive coupling (Dinh et al., 2015): volume-preserving, exactly invertible."""

    kind: ClassVar[str] = "nice"

    def __init__(self, dims: int, non_linearity: str = "relu", reduction_factor: float = 2):
        super().__init__(dims)
        self.F = subnet(self.split_len2, self.split_len1, non_linearity, reduction_factor)
        self.G = subnet(self.split_len1, self.split_len2, non_linearity, reduction_factor)

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = self._halves(x)
        if not rev:
            y1 = x1 + self.F(x2)
            y2 = x2 + self.G(y1)
        else:
            y2 = x2 - self.G(x1)
            y1 = x1 - self.F(y2)
        return torch.cat((y1, y2), -1)


class GLOWCouplingBlock(InvertibleAdapter):
    """Affine coupling with one subnet per half predicting [log-scale, shift] (Kingma & Dhariwal, 2018),
    the scale soft-clamped to exp(+-clamp)."""

    kind: ClassVar[str] = "glow"

    def __init__(
        self, dims: int, non_linearity: str = "relu", reduction_factor: float = 2, clamp: float = GLOW_CLAMP
    ):
        super().__init__(dims)
        self.clamp = float(clamp)
        self.s1 = subnet(self.split_len1, 2 * self.split_len2, non_linearity, reduction_factor)
        self.s2 = subnet(self.split_len2, 2 * self.split_len1, non_linearity, reduction_factor)

    def log_e(self, s: torch.Tensor) -> torch.Tensor:
        """The soft-clamped log-scale: clamp * 0.636 * atan(s / clamp)."""
        return self.clamp * GLOW_ATAN_FACTOR * torch.atan(s / self.clamp)

    def e(self, s: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_e(s))

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = self._halves(x)
        d1, d2 = self.split_len1, self.split_len2
        if not rev:
            r2 = self.s2(x2)
            y1 = self.e(r2[..., :d1]) * x1 + r2[..., d1:]
            r1 = self.s1(y1)
            y2 = self.e(r1[..., :d2]) * x2 + r1[..., d2:]
        else:
            r1 = self.s1(x1)
            y2 = (x2 - r1[..., d2:]) / self.e(r1[..., :d2])
            r2 = self.s2(y2)
            y1 = (x1 - r2[..., d1:]) / self.e(r2[..., :d1])
        return torch.cat((y1, y2), -1)


BLOCKS: dict[str, type[InvertibleAdapter]] = {"nice": NICECouplingBlock, "glow": GLOWCouplingBlock}


def build_invertible(spec: InvertibleSpec, dims: int) -> InvertibleAdapter:
    """A freshly initialised coupling block for ``spec`` over width ``dims`` (the embedding size)."""
    cls = BLOCKS.get(spec.kind)
    if cls is None:
        raise ValueError(f"invalid invertible adapter type {spec.kind!r}; use one of {sorted(BLOCKS)}")
    block = cls(dims, non_linearity=spec.non_linearity, reduction_factor=spec.reduction_factor)
    block.apply(init_bert_weights)
    return block


__all__ = [
    "BLOCKS",
    "GLOWCouplingBlock",
    "InvertibleAdapter",
    "NICECouplingBlock",
    "build_invertible",
    "init_bert_weights",
    "subnet",
]
