"""Which linear layers LoRA/IA3 can adapt: the declaration an architecture file makes for this room."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LoRASite"]


@dataclass(frozen=True)
class LoRASite:
    """A linear layer LoRA/IA3 can wrap: `location` is selfattn, intermediate or output.

    `attn_keys` lists the attention matrices the layer computes: ("q",) for a plain projection,
    ("q", "k", "v") for a fused one whose output is split in equal thirds. `module` is relative to one
    transformer layer.
    """

    module: str
    location: str
    attn_keys: tuple[str, ...] = ()
