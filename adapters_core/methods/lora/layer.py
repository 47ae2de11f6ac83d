"""The modules that adapt one linear layer: the shared `LinearAdapter` interface and LoRA's low-rank update.

A target layer may be fused (GPT-2's c_attn holds q, k and v): then an adapter covers only the enabled
thirds and LoRA's B is block-diagonal over them (AdapterHub's grouped conv1d). Parameter names (lora_A,
lora_B) follow AdapterHub so files load.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .config import LoRAConfig


class LinearAdapter(nn.Module):
    """An adapter on a linear layer's output: `kind` "add" adds an update to it, "scale" multiplies it.

    The batched kernels group modules by `shape_key()`; a "scale" module provides `vector()`, an "add" module
    `lora_A` and `b_effective()`.
    """

    kind: ClassVar[str] = ""

    def stack_step(self, hidden: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The running value of a Stack after this adapter, given the layer input `x` (None: first in the stack)."""
        raise NotImplementedError

    def shape_key(self) -> tuple:
        raise NotImplementedError

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor) -> None:
        """Fold the adapter into the layer: `weight` is the (out, in) view, `rows` the outputs it covers."""
        raise NotImplementedError


class LoRA(LinearAdapter):
    """delta(x) = dropout(x) @ A^T @ B_eff^T * alpha / r, written into the enabled outputs."""

    kind = "add"

    def __init__(self, in_features: int, out_enabled: int, groups: int, config: LoRAConfig):
        super().__init__()
        if config.composition_mode != "add":
            raise ValueError("LoRA needs composition_mode='add'")
        self.r, self.groups = config.r, groups
        self.scaling = config.alpha / config.r
        self.lora_A = nn.Parameter(torch.zeros(config.r * groups, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_enabled, config.r))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        with torch.no_grad():
            if config.init_weights == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
            elif config.init_weights == "bert":
                self.lora_A.normal_(0.0, 0.02)
                self.lora_B.normal_(0.0, 0.02)
            elif config.init_weights == "ia3":
                self.lora_A.fill_(1.0)
                self.lora_B.fill_(1.0)
            else:
                raise ValueError(f"unknown init_weights {config.init_weights!r}")

    def slot_parameters(self) -> list[nn.Parameter]:
        """What the batched kernel stacks (see methods.slots); a fused layer's block-diagonal B is computed."""
        return [self.lora_A, self.lora_B] if self.groups == 1 else [self.lora_A]

    def b_effective(self) -> torch.Tensor:
        """B as one (out_enabled, r * groups) matrix: block-diagonal when the layer is fused."""
        if self.groups == 1:
            return self.lora_B
        return torch.block_diag(*self.lora_B.chunk(self.groups, dim=0))

    def delta_weight(self) -> torch.Tensor:
        """(out_enabled, in) update that merging adds to the base weight."""
        return self.b_effective() @ self.lora_A * self.scaling

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lora_dropout(hidden) @ self.lora_A.t() @ self.b_effective().t() * self.scaling

    def stack_step(self, hidden: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return self(x if hidden is None else hidden)

    def shape_key(self) -> tuple:
        return ("add", tuple(self.lora_A.shape), tuple(self.lora_B.shape))

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor) -> None:
        weight[rows] = weight[rows] + self.delta_weight().to(weight.dtype)
