"""Per-forward routing: the active composition compiled once into row -> adapters, kept in a ForwardContext.

Method layers never walk the composition themselves on the fast path: they read `RowPlan.rows`, where
row i runs the stack of adapter names `rows[i]` (empty = the bare backbone). A part of the batch whose
composition cannot be flattened this way (it holds Fuse, Split or Average) is kept as a tree over its
own rows (`RowPlan.trees`) and interpreted by the methods' fallback; the other rows of a BatchSplit stay
on the fast path.

Tensors derived from the plan (row and slot indices, LoRA scalings, Average weights) are built on the host
and copied to a device once per forward, by the first layer that needs each (`shared_tensor`, through
`place`, keyed by device in the ForwardContext); every other layer reuses them.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .composition import (
    AdapterCompositionBlock,
    Average,
    BatchSplit,
    Fuse,
    Parallel,
    Split,
    Stack,
    parse_composition,
)

Rows = tuple[tuple[str, ...], ...]


def place(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The one host->device copy of routing state: `t` (built on the host) on `device`."""
    return t if t.device == device else t.to(device, non_blocking=True)


def host_to_device(values: Sequence[Any], device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` built on the host as a tensor and placed on `device` (no caching)."""
    return place(torch.tensor(values, dtype=dtype, device="cpu"), torch.device(device))


def shared_tensor(values: Sequence[Any], device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` as a tensor on `device`, built and copied once per forward and shared by every layer.

    Keyed by (values, dtype, device) in the current ForwardContext; outside a forward it is built anew.
    """
    device = torch.device(device)
    ctx = ForwardContext.current()
    if ctx is None:
        return host_to_device(values, device, dtype)
    key = (tuple(values), dtype, device)
    hit = ctx.tensors.get(key)
    if hit is None:
        hit = ctx.tensors[key] = host_to_device(key[0], device, dtype)
    return hit


@dataclass(frozen=True)
class TreeRows:
    """Rows [start, stop) whose composition `block` does not flatten: the methods' tree interpreters run it
    on those rows alone (a BatchSplit child behaves exactly as it would alone on its rows)."""

    start: int
    stop: int
    block: AdapterCompositionBlock | str

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(frozen=True)
class RowPlan:
    """Routing for one forward pass: `rows[i]` is the adapter stack of (replicated) row i.

    Rows inside a `trees` entry belong to the tree interpreters; their `rows` entries keep only what
    flattens around the tree (prefix tuning, which never sits under Fuse, Split or Average, reads them).
    """

    rows: Rows
    replicate: int = 1
    trees: tuple[TreeRows, ...] = ()

    def groups(self, present: frozenset[str]) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
        """Rows grouped by the sub-stack of adapters that exist at one location (`present`).

        Returns ((stack, row_indices), ...) for non-empty stacks only, tree rows left out; cached per
        `present` set.
        """
        cache = _group_cache(self)
        hit = cache.get(present)
        if hit is not None:
            return hit
        by_stack: dict[tuple[str, ...], list[int]] = {}
        in_trees = {i for t in self.trees for i in range(t.start, t.stop)}
        for i, stack in enumerate(self.rows):
            if i in in_trees:
                continue
            sub = tuple(n for n in stack if n in present)
            if sub:
                by_stack.setdefault(sub, []).append(i)
        result = tuple((stack, tuple(idx)) for stack, idx in by_stack.items())
        cache[present] = result
        return result


def _group_cache(plan: RowPlan) -> dict[frozenset[str], Any]:
    ctx = ForwardContext.current()
    if ctx is not None and ctx.plan is plan:
        return ctx.group_cache
    return {}


def touches(block: AdapterCompositionBlock | str | None, names: Collection[str]) -> bool:
    """Whether a setup (or one of its children) names any of `names` (the adapters present at a site)."""
    if block is None:
        return False
    if isinstance(block, str):
        return block in names
    return any(n in names for n in block.flatten())


class FlattenError(Exception):
    """Raised internally when a composition needs the tree interpreter."""


def _flatten(block: AdapterCompositionBlock | str | None, n: int, lenient: bool = False) -> list[tuple[str, ...]]:
    if block is None or block == "":
        return [()] * n
    if lenient and isinstance(block, (Fuse, Split, Average)):
        return [()] * n
    if isinstance(block, str):
        return [(block,)] * n
    if isinstance(block, Stack):
        rows: list[tuple[str, ...]] = [()] * n
        for child in block.children:
            sub = _flatten(child, n, lenient)
            rows = [a + b for a, b in zip(rows, sub, strict=True)]
        return rows
    if isinstance(block, BatchSplit):
        if sum(block.batch_sizes) != n:
            raise ValueError(
                f"{block!r}: batch_sizes sum to {sum(block.batch_sizes)} but the batch has {n} rows"
            )
        rows = []
        for child, size in zip(block.children, block.batch_sizes, strict=True):
            rows.extend(_flatten(child, size, lenient))
        return rows
    if isinstance(block, (Fuse, Split, Average, Parallel)):
        raise FlattenError(type(block).__name__)
    raise ValueError(f"unknown composition element {block!r}")


def _find_parallel(block: AdapterCompositionBlock | str | None) -> Parallel | None:
    if isinstance(block, Parallel):
        return block
    if isinstance(block, Stack):
        found = [p for p in (_find_parallel(c) for c in block.children) if p is not None]
        if len(found) > 1:
            raise ValueError(f"{block!r}: at most one Parallel block per setup is supported")
        return found[0] if found else None
    return None


@dataclass(frozen=True)
class Compiled:
    """A setup compiled for one batch: its plan (None without a setup) and how often the batch is replicated."""

    plan: RowPlan | None
    replicate: int


def compile_setup(setup: AdapterCompositionBlock | str | None, batch_size: int) -> Compiled:
    """Compile `setup` for a batch of `batch_size` rows.

    Parallel(a, b, ...) replicates the input batch once per child (done at the model input), after which
    it is exactly BatchSplit(a, b, ...) over the copies. A part that holds Fuse, Split or Average becomes a
    `TreeRows` over its rows: the whole batch, or one child of a top-level BatchSplit.
    """
    setup = parse_composition(setup) if setup is not None else None
    if setup is None:
        return Compiled(None, 1)
    parallel = _find_parallel(setup)
    k = 1
    if parallel is not None:
        k = len(parallel.children)
        setup = _replace(setup, parallel, BatchSplit(*parallel.children, batch_sizes=[batch_size] * k))
    rows, trees = _compile(setup, 0, batch_size * k)
    return Compiled(RowPlan(tuple(rows), replicate=k, trees=tuple(trees)), k)


def _compile(block: AdapterCompositionBlock | str | None, start: int, n: int) -> tuple[list[tuple[str, ...]], list[TreeRows]]:
    """Rows start..start+n of `block`: flat stacks, and the tree parts among them (BatchSplit children apart)."""
    if n == 0:
        return [], []
    try:
        return _flatten(block, n), []
    except FlattenError:
        pass
    inner = block
    while isinstance(inner, Stack) and len(inner.children) == 1:
        inner = inner.children[0]
    if isinstance(inner, BatchSplit):
        rows: list[tuple[str, ...]] = []
        trees: list[TreeRows] = []
        at = start
        for child, size in zip(inner.children, inner.batch_sizes, strict=True):
            child_rows, child_trees = _compile(child, at, size)
            rows.extend(child_rows)
            trees.extend(child_trees)
            at += size
        return rows, trees
    return _flatten(block, n, lenient=True), [TreeRows(start, start + n, block)]


def _replace(block: Any, target: Parallel, new: BatchSplit) -> Any:
    if block is target:
        return new
    if isinstance(block, Stack):
        return Stack(*[_replace(c, target, new) for c in block.children])
    return block


@dataclass
class ForwardContext:
    """State of one forward pass on one thread: the setup, its compiled plan and per-layer scratch space."""

    setup: AdapterCompositionBlock | None
    plan: RowPlan | None
    head_setup: Any = None
    replicate: int = 1
    stash: dict[Any, Any] = field(default_factory=dict)
    prefix_states: dict[str, Any] = field(default_factory=dict)
    group_cache: dict[frozenset[str], Any] = field(default_factory=dict)
    tensors: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)

    _local = threading.local()

    @classmethod
    def _stack(cls) -> list[ForwardContext]:
        stack = getattr(cls._local, "stack", None)
        if stack is None:
            stack = cls._local.stack = []
        return stack

    @classmethod
    def current(cls) -> ForwardContext | None:
        stack = cls._stack()
        return stack[-1] if stack else None


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make `ctx` the current context of this thread for the duration of one forward pass."""
    stack = ForwardContext._stack()
    stack.append(ctx)
    try:
        yield ctx
    finally:
        stack.pop()
