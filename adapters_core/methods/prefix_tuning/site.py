"""Where prefixes attach: the declaration an architecture file makes for this room."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PrefixSite"]


@dataclass(frozen=True)
class PrefixSite:
    """An attention module that attends to prefixes, relative to one layer.

    `location` names AdapterHub's prefix module: "self" (decoder or encoder-only self-attention,
    ``self_prefix``), "encoder" (an encoder-decoder's encoder, ``encoder_prefix``) or "cross"
    (``cross_prefix``). `relative_bias`: the attention module, relative to the first layer of the same
    layer list, whose ``compute_bias(query_length, key_length, device, past_seen_tokens)`` gives T5-style
    relative position biases; with a prefix, keys are counted from the first prefix position as AdapterHub
    counts them.
    """

    attention: str
    location: str = "self"
    relative_bias: str = ""

    @property
    def prefix_name(self) -> str:
        return f"{self.location}_prefix"
