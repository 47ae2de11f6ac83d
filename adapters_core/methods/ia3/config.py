"""IA3Config: (IA)^3, learned vectors that scale k, v and the FFN input (Liu et al., 2022) [``ia3``].

AdapterHub stores it as a LoRA config with ``composition_mode="scale"``, so it reads as architecture
``"lora"`` whenever that mode is set.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...configuration import register_architecture, register_config_names
from ..lora.config import LoRAConfig

__all__ = ["IA3Config"]


@dataclass(frozen=True, eq=False, kw_only=True)
class IA3Config(LoRAConfig):
    """(IA)^3 (Liu et al., 2022): learned vectors that scale k, v and the FFN input [``ia3``]."""

    intermediate_lora: bool = True
    r: int = 1
    alpha: float = 1
    attn_matrices: tuple[str, ...] = ("k", "v")
    composition_mode: str = "scale"
    init_weights: str = "ia3"


register_architecture("lora", IA3Config, when=lambda data: data.get("composition_mode") == "scale")
register_config_names(ia3=IA3Config)
