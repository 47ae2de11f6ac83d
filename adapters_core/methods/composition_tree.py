"""The loop fallback: compositions that do not flatten to one adapter stack per row (Fuse, Split, Average).

Each block is interpreted recursively on slices of the batch, with AdapterHub's semantics for the
bottleneck stages (pre_forward of a block's first adapter, post_forward of the last), except Average:
sum_i w_i * h_i with weights normalised to 1 (AdapterHub divides by N once more).
Parallel never reaches here: the model replicates the input and rewrites it as a BatchSplit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..composition import AdapterCompositionBlock, Average, BatchSplit, Fuse, Split, Stack
from .bottleneck import BottleneckAdapter
from .lora import IA3, LoRA

Block = AdapterCompositionBlock | str | None


@dataclass(frozen=True)
class BnState:
    hidden: torch.Tensor
    x: torch.Tensor
    residual: torch.Tensor
    up: torch.Tensor | None = None
    last: str | None = None


def _slice_rows(s: BnState, sl: slice, dim: int) -> BnState:
    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else (t[sl] if dim == 0 else t[:, sl])
    return BnState(cut(s.hidden), cut(s.x), cut(s.residual), cut(s.up), s.last)


def _cat(states: list[BnState], dim: int) -> BnState:
    ups = [s.up for s in states]
    up = torch.cat(ups, dim=dim) if all(u is not None for u in ups) else None
    last = next((s.last for s in reversed(states) if s.last is not None), None)
    return BnState(torch.cat([s.hidden for s in states], dim), torch.cat([s.x for s in states], dim),
                   torch.cat([s.residual for s in states], dim), up, last)


def _contains(block: Block, adapters: nn.ModuleDict) -> bool:
    if block is None:
        return False
    if isinstance(block, str):
        return block in adapters
    return any(n in adapters for n in block.flatten())


class BottleneckTree:
    """Interprets one composition at one bottleneck location."""

    def __init__(self, adapters: nn.ModuleDict, fusions: nn.ModuleDict | None,
                 layer_norm: Callable[[torch.Tensor], torch.Tensor] | None, fusion_configs: dict):
        self.adapters, self.fusions, self.ln, self.fusion_configs = adapters, fusions, layer_norm, fusion_configs

    def run(self, setup: Block, h: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, BottleneckAdapter | None]:
        """(pre-final value, the last adapter applied) — None when no adapter of the setup sits here."""
        state = self.compose(setup, BnState(h, x, x), 0)
        if state.last is None:
            return h, None
        last = self.adapters[state.last]
        return last.pre_final(state.hidden, h), last

    def _pre(self, name: str, s: BnState) -> BnState:
        hidden, residual = self.adapters[name].pre_forward(s.hidden, s.x, self.ln)
        return replace(s, hidden=hidden, residual=residual)

    def _single(self, name: str, s: BnState) -> BnState:
        adapter: BottleneckAdapter = self.adapters[name]
        up = adapter.adapter_up(adapter.adapter_down(s.hidden)) * adapter.scaling
        return replace(s, hidden=adapter.finish(up, s.residual), up=up, last=name)

    def _first_here(self, block: Block) -> str | None:
        names = [block] if isinstance(block, str) else list(block.flatten()) if block is not None else []
        return next((n for n in names if n in self.adapters), None)

    def compose(self, block: Block, s: BnState, lvl: int) -> BnState:
        if block is None or not _contains(block, self.adapters):
            return s
        if isinstance(block, str):
            return self._single(block, self._pre(block, s))
        if isinstance(block, Stack):
            for child in block.children:
                if isinstance(child, str):
                    if child in self.adapters:
                        s = self._single(child, self._pre(child, s))
                else:
                    s = self.compose(child, s, lvl + 1)
            return s
        if isinstance(block, Fuse):
            return self._fuse(block, s, lvl)
        first = self._first_here(block)
        s = self._pre(first, s) if first is not None else s
        if isinstance(block, BatchSplit):
            parts, start = [], 0
            for child, size in zip(block.children, block.batch_sizes, strict=True):
                sub = _slice_rows(s, slice(start, start + size), 0)
                parts.append(self._child(child, sub, lvl))
                start += size
            return _cat(parts, 0)
        if isinstance(block, Split):
            parts, start = [], 0
            for child, size in zip(block.children, block.splits, strict=True):
                sub = _slice_rows(s, slice(start, start + size), 1)
                parts.append(self._child(child, sub, lvl))
                start += size
            return _cat(parts, 1)
        if isinstance(block, Average):
            outs = [self._child(c, s, lvl) for c in block.children]
            weights = torch.tensor(block.weights, dtype=s.hidden.dtype, device=s.hidden.device)
            hidden = sum(w * o.hidden for w, o in zip(weights, outs, strict=True))
            last = next((o.last for o in reversed(outs) if o.last is not None), None)
            return replace(s, hidden=hidden, last=last)
        raise ValueError(f"{block!r} cannot be applied by bottleneck adapters")

    def _child(self, child: Block, s: BnState, lvl: int) -> BnState:
        if isinstance(child, str):
            return self._single(child, s) if child in self.adapters else s
        return self.compose(child, s, lvl + 1)

    def _fuse(self, block: Fuse, s: BnState, lvl: int) -> BnState:
        if self.fusions is None or block.name not in self.fusions:
            raise ValueError(f"{block!r}: no AdapterFusion layer named {block.name!r}; call add_adapter_fusion first")
        cfg = self.fusion_configs[block.name]
        last = self.adapters[block.last()]
        # Like AdapterHub: the last child's pre_forward prepares the shared input; the query is taken
        # before or after the model's LayerNorm as the fusion config says.
        hidden, residual = last.pre_forward(s.hidden, s.x, self.ln)
        query = s.hidden if cfg.query_before_ln and not last.is_parallel else hidden
        outs = [self._child(c, replace(s, hidden=hidden, residual=residual), lvl) for c in block.children]
        ups = torch.stack([o.up for o in outs], dim=2)
        fused = self.fusions[block.name](query, ups, residual)
        return replace(s, hidden=fused, residual=residual, last=block.last())


def lora_tree(
    loras: nn.ModuleDict, setup: Block, x: torch.Tensor
) -> tuple[torch.Tensor | None, LoRA | IA3 | None]:
    """(hidden, last module) for LoRA/IA3 under a tree setup (Stack, BatchSplit, Average)."""

    def compose(block: Block, xs: torch.Tensor, hidden: torch.Tensor | None) -> tuple[torch.Tensor | None, str | None]:
        if block is None or not _contains(block, loras):
            return hidden, None
        if isinstance(block, str):
            mod = loras[block]
            if isinstance(mod, IA3):
                return mod(hidden, xs[..., :1].expand(*xs.shape[:-1], mod.lora_B.shape[0])), block
            return mod(xs if hidden is None else hidden), block
        if isinstance(block, Stack):
            last = None
            for child in block.children:
                hidden, got = compose(child, xs, hidden)
                last = got or last
            return hidden, last
        if isinstance(block, BatchSplit):
            parts, last, start = [], None, 0
            for child, size in zip(block.children, block.batch_sizes, strict=True):
                h_part = None if hidden is None else hidden[start:start + size]
                out, got = compose(child, xs[start:start + size], h_part)
                parts.append(out)
                last = got or last
                start += size
            if all(p is None for p in parts):
                return hidden, None
            raise ValueError(f"{block!r}: LoRA rows inside a tree composition must all have an adapter")
        if isinstance(block, Average):
            outs = [compose(c, xs, hidden) for c in block.children]
            weights = torch.tensor(block.weights, dtype=xs.dtype, device=xs.device)
            mixed = sum(w * o for w, (o, _) in zip(weights, outs, strict=True) if o is not None)
            return mixed, next((g for _, g in reversed(outs) if g is not None), None)
        raise ValueError(f"{block!r} cannot be applied by LoRA adapters")

    hidden, last = compose(setup, x, None)
    return hidden, (loras[last] if last is not None else None)
