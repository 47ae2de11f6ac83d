"""The bottleneck tree interpreter: rows whose composition does not flatten to one adapter stack (Fuse, Split, Average).

Each block is interpreted recursively on slices of the batch, with AdapterHub's semantics for the
bottleneck stages (pre_forward of a block's first adapter, post_forward of the last), except Average:
sum_i w_i * h_i with weights normalised to 1 (AdapterHub divides by N once more). Fuse runs the location's
AdapterFusion layer (any module called as fusion(query, ups, residual) with a `config`).
Parallel never reaches here: the model replicates the input and rewrites it as a BatchSplit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ...composition import AdapterCompositionBlock, Average, BatchSplit, Fuse, Split, Stack
from ...routing import shared_tensor, touches
from .adapter import BottleneckAdapter

Block = AdapterCompositionBlock | str | None


@dataclass(frozen=True)
class BnState:
    """Hidden states of a row range with, per row, the last adapter applied (None: none yet)."""

    hidden: torch.Tensor
    x: torch.Tensor
    residual: torch.Tensor
    up: torch.Tensor | None
    last: tuple[str | None, ...]


def _cut(s: BnState, sl: slice, dim: int) -> BnState:
    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else (t[sl] if dim == 0 else t[:, sl])
    last = s.last[sl] if dim == 0 else s.last
    return BnState(cut(s.hidden), cut(s.x), cut(s.residual), cut(s.up), last)


def _cat(states: list[BnState], dim: int) -> BnState:
    ups = [s.up for s in states]
    up = torch.cat(ups, dim=dim) if all(u is not None for u in ups) else None
    if dim == 0:
        last = tuple(n for s in states for n in s.last)
    else:  # Split: every row ends with the last child's adapter (AdapterHub's rule)
        last = next((s.last for s in reversed(states) if any(n is not None for n in s.last)), states[-1].last)
    return BnState(torch.cat([s.hidden for s in states], dim), torch.cat([s.x for s in states], dim),
                   torch.cat([s.residual for s in states], dim), up, last)


def _per_part(
    s: BnState, children: tuple, sizes: tuple[int, ...], dim: int, fn: Callable[[Block, BnState], BnState]
) -> BnState:
    """Run child i on the i-th consecutive part (rows for dim 0, positions for dim 1) and join the parts."""
    parts, start = [], 0
    for child, size in zip(children, sizes, strict=True):
        parts.append(fn(child, _cut(s, slice(start, start + size), dim)))
        start += size
    return _cat(parts, dim)


class BottleneckTree:
    """Interprets one composition at one bottleneck location.

    BatchSplit children are independent: each behaves exactly like the same child run alone on its
    rows (that is what makes a row's output independent of its neighbours). Split, Average and Fuse
    follow AdapterHub: the block's first adapter prepares the shared input once.
    """

    def __init__(self, adapters: nn.ModuleDict, fusions: nn.ModuleDict | None,
                 layer_norm: Callable[[torch.Tensor], torch.Tensor] | None):
        self.adapters, self.fusions, self.ln = adapters, fusions, layer_norm

    def run(self, setup: Block, h: torch.Tensor, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, BottleneckAdapter]]:
        """[(row indices, pre-final value of those rows, their last adapter)] — rows no adapter touched are left out."""
        state = self.compose(setup, BnState(h, x, x, None, (None,) * h.shape[0]))
        by_last: dict[str, list[int]] = {}
        for row, name in enumerate(state.last):
            if name is not None:
                by_last.setdefault(name, []).append(row)
        out = []
        for name, rows in by_last.items():
            idx = shared_tensor(rows, h.device)
            last = self.adapters[name]
            out.append((idx, last.pre_final(state.hidden[idx], h[idx]), last))
        return out

    def _pre(self, name: str, s: BnState) -> BnState:
        hidden, residual = self.adapters[name].pre_forward(s.hidden, s.x, self.ln)
        return replace(s, hidden=hidden, residual=residual)

    def _single(self, name: str, s: BnState) -> BnState:
        adapter: BottleneckAdapter = self.adapters[name]
        up = adapter.adapter_up(adapter.adapter_down(s.hidden)) * adapter.scaling
        return replace(s, hidden=adapter.finish(up, s.residual), up=up, last=(name,) * s.hidden.shape[0])

    def _first_here(self, block: AdapterCompositionBlock) -> str | None:
        return next((n for n in block.flatten() if n in self.adapters), None)

    def compose(self, block: Block, s: BnState) -> BnState:
        """Apply `block` as a whole setup would (each adapter prepares its own input)."""
        if block is None or not touches(block, self.adapters):
            return s
        if isinstance(block, str):
            return self._single(block, self._pre(block, s))
        if isinstance(block, Stack):
            for child in block.children:
                s = self.compose(child, s)
            return s
        if isinstance(block, BatchSplit):
            return _per_part(s, block.children, block.batch_sizes, 0, self.compose)
        if isinstance(block, Fuse):
            return self._fuse(block, s)
        s = self._pre(self._first_here(block), s)
        return self._prepared(block, s)

    def _prepared(self, block: Block, s: BnState) -> BnState:
        """Apply `block` to a state its parent has already prepared (AdapterHub's compose_single level)."""
        if block is None or not touches(block, self.adapters):
            return s
        if isinstance(block, str):
            return self._single(block, s)
        if isinstance(block, Split):
            return _per_part(s, block.children, block.splits, 1, self._prepared)
        if isinstance(block, Average):
            outs = [self._prepared(c, s) for c in block.children]
            weights = shared_tensor(block.weights, s.hidden.device, s.hidden.dtype)
            hidden = sum(w * o.hidden for w, o in zip(weights, outs, strict=True))
            last = next((o.last for o in reversed(outs) if any(n is not None for n in o.last)), s.last)
            return replace(s, hidden=hidden, last=last)
        if isinstance(block, BatchSplit):
            return _per_part(s, block.children, block.batch_sizes, 0, self._prepared)
        return self.compose(block, s)  # Stack or Fuse inside a prepared block: they prepare themselves

    def _fuse(self, block: Fuse, s: BnState) -> BnState:
        if self.fusions is None or block.name not in self.fusions:
            raise ValueError(f"{block!r}: no AdapterFusion layer named {block.name!r}; call add_adapter_fusion first")
        fusion = self.fusions[block.name]
        last = self.adapters[block.last()]
        # Like AdapterHub: the last child's pre_forward prepares the shared input; the query is taken
        # before or after the model's LayerNorm as the fusion config says.
        hidden, residual = last.pre_forward(s.hidden, s.x, self.ln)
        query = s.hidden if fusion.config.query_before_ln and not last.is_parallel else hidden
        prepared = replace(s, hidden=hidden, residual=residual)
        outs = [self._prepared(c, prepared) for c in block.children]
        ups = torch.stack([o.up for o in outs], dim=2)
        fused = fusion(query, ups, residual)
        return replace(s, hidden=fused, residual=residual, last=(block.last(),) * s.hidden.shape[0])
