"""(IA)^3's module: a learned vector that scales the enabled outputs of one linear layer (parameter lora_B)."""

from __future__ import annotations

import torch
from torch import nn

from ..lora.config import LoRAConfig
from ..lora.layer import LinearAdapter


class IA3(LinearAdapter):
    """out[..., enabled] *= lora_B * alpha (a learned vector per output feature)."""

    kind = "scale"

    def __init__(self, out_enabled: int, config: LoRAConfig):
        super().__init__()
        if config.composition_mode != "scale":
            raise ValueError("(IA)^3 needs composition_mode='scale'")
        if config.r != 1:
            raise ValueError(f"(IA)^3 needs r=1, got r={config.r}")
        if config.dropout > 0:
            raise ValueError("(IA)^3 does not support dropout")
        self.scaling = float(config.alpha)
        self.lora_B = nn.Parameter(torch.zeros(out_enabled, 1))
        with torch.no_grad():
            if config.init_weights == "ia3":
                self.lora_B.fill_(1.0)
            elif config.init_weights == "bert":
                self.lora_B.normal_(0.0, 0.02)
            elif config.init_weights != "lora":
                raise ValueError(f"unknown init_weights {config.init_weights!r}")

    def slot_parameters(self) -> list[nn.Parameter]:
        """The vector a mixed batch gathers per row (see methods.slots)."""
        return [self.lora_B]

    def vector(self) -> torch.Tensor:
        return self.lora_B[:, 0] * self.scaling

    def forward(self, hidden: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        vec = self.vector()
        return vec.expand(like.shape[:-1] + vec.shape) if hidden is None else hidden * vec

    def stack_step(self, hidden: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return self(hidden, x[..., :1].expand(*x.shape[:-1], self.lora_B.shape[0]))

    def shape_key(self) -> tuple:
        return ("scale", tuple(self.lora_B.shape))

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor) -> None:
        vec = self.vector().to(weight.dtype)
        weight[rows] = weight[rows] * vec[:, None]
        if bias is not None:
            bias[rows] = bias[rows] * vec
