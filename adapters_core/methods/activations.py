"""AdapterHub's activation names (``non_linearity``) as functions and as parameter-free modules."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import get_activation

__all__ = ["Activation", "activation"]


def activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """AdapterHub's activation names, resolved through transformers' registry."""
    if name is None:
        return nn.Identity()
    key = name.lower()
    if key == "leakyrelu":
        return nn.LeakyReLU()
    if key in ("linear", "identity"):
        return nn.Identity()
    return get_activation(key)


class Activation(nn.Module):
    """A named activation as a module (sits inside adapter_down like AdapterHub's)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name.lower()
        self.fn = activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
