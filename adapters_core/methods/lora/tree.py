"""The LoRA/IA3 tree interpreter: rows whose composition does not flatten to one adapter stack (Average).

Stack applies its children in turn (LoRA on the running hidden value, IA3 scaling it), Average mixes the
children's updates with normalised weights and BatchSplit runs each child on its rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...composition import AdapterCompositionBlock, Average, BatchSplit, Stack
from ...routing import shared_tensor, touches
from .layer import LinearAdapter

Block = AdapterCompositionBlock | str | None


def lora_tree(
    loras: nn.ModuleDict, setup: Block, x: torch.Tensor, output: torch.Tensor,
    combine: Callable[[torch.Tensor, torch.Tensor, LinearAdapter], torch.Tensor],
) -> torch.Tensor | None:
    """`output` with LoRA/IA3 applied under a tree setup (Stack, BatchSplit, Average); None if untouched.

    BatchSplit children are independent row ranges; `combine(rows_output, hidden, last_module)` folds a
    range's accumulated update into its output.
    """

    def hidden_of(block: Block, xs: torch.Tensor, hidden: torch.Tensor | None) -> tuple[torch.Tensor | None, str | None]:
        if block is None or not touches(block, loras):
            return hidden, None
        if isinstance(block, str):
            return loras[block].stack_step(hidden, xs), block
        if isinstance(block, Stack):
            last = None
            for child in block.children:
                hidden, got = hidden_of(child, xs, hidden)
                last = got or last
            return hidden, last
        if isinstance(block, Average):
            outs = [hidden_of(c, xs, hidden) for c in block.children]
            weights = shared_tensor(block.weights, xs.device, xs.dtype)
            mixed = sum(w * o for w, (o, _) in zip(weights, outs, strict=True) if o is not None)
            return mixed, next((g for _, g in reversed(outs) if g is not None), None)
        raise ValueError(f"{block!r} cannot be applied by LoRA adapters inside this composition")

    def apply(block: Block, xs: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        while isinstance(block, Stack) and len(block.children) == 1:
            block = block.children[0]
        if isinstance(block, BatchSplit):
            parts, start, touched = [], 0, False
            for child, size in zip(block.children, block.batch_sizes, strict=True):
                got = apply(child, xs[start:start + size], out[start:start + size])
                touched = touched or got is not None
                parts.append(out[start:start + size] if got is None else got)
                start += size
            return torch.cat(parts, dim=0) if touched else None
        hidden, last = hidden_of(block, xs, None)
        return None if last is None else combine(out, hidden, loras[last])

    return apply(setup, x, output)
