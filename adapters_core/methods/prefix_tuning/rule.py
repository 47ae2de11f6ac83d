"""Which attention implementations carry prefixes; under any other one a prefix is refused, never dropped.

The model-level check (`check_implementation`) runs when a prefix adapter is added, activated and at every
forward that routes one, so a later `set_attn_implementation` cannot silently drop it; `refusing_attention`
wraps every other implementation transformers registers, as a last guard at the attention call itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: The attention implementations the prefix wrapper carries prefixes through.
CARRIED = ("eager", "sdpa", "flex_attention")

#: (module, batch) -> (keys, values, keep[, every position kept]) or None; without the flag it is read from keep.
PrefixLookup = Callable[[nn.Module, int], tuple[torch.Tensor, ...] | tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None]


def check_implementation(name: object) -> None:
    """Raise ValueError unless attention implementation `name` carries prefixes."""
    if name not in CARRIED:
        supported = ", ".join(repr(n) for n in CARRIED)
        raise ValueError(
            f"prefix tuning is not supported under attn_implementation={name!r} (the prefix would be dropped); "
            f"supported: {supported} (see model.set_attn_implementation)"
        )


def refuse_packed(kwargs: dict[str, Any], name: str) -> None:
    """Refuse a prefix on packed sequences (continuous batching passes cu_seq_lens_*): rows are not sequences."""
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        raise ValueError(f"prefix tuning is not supported on packed sequences (continuous batching) under {name!r}")


def refusing_attention(name: str, delegate: Callable[..., Any], lookup: PrefixLookup) -> Callable[..., Any]:
    """`delegate` unchanged, except that a call whose rows carry a prefix raises (naming `name`)."""

    def attention(module: nn.Module, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        if lookup(module, key.shape[0]) is not None:
            check_implementation(name)
        return delegate(module, query, key, value, attention_mask, **kwargs)

    return attention
