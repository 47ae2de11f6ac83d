"""Per-forward routing: the active composition compiled once into row -> adapters, kept in a ForwardContext.

Method layers never walk the composition themselves on the fast path: they read `RowPlan.rows`, where
row i runs the stack of adapter names `rows[i]` (empty = the bare backbone). Compositions that cannot be
flattened this way (Fuse, Split, Average) are kept as a tree and interpreted by the methods' fallback.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class RowPlan:
    """Flat routing for one forward pass: `rows[i]` is the adapter stack of (replicated) row i."""

    rows: Rows
    replicate: int = 1

    @property
    def names(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for stack in self.rows:
            for name in stack:
                seen.setdefault(name)
        return tuple(seen)

    def groups(self, present: frozenset[str]) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
        """Rows grouped by the sub-stack of adapters that exist at one location (`present`).

        Returns ((stack, row_indices), ...) for non-empty stacks only; cached per `present` set.
        """
        cache = _group_cache(self)
        hit = cache.get(present)
        if hit is not None:
            return hit
        by_stack: dict[tuple[str, ...], list[int]] = {}
        for i, stack in enumerate(self.rows):
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
    """A setup compiled for one batch: a flat plan, or a tree (with a lenient plan for prefix routing)."""

    plan: RowPlan | None
    tree: AdapterCompositionBlock | None
    replicate: int


def compile_setup(setup: AdapterCompositionBlock | str | None, batch_size: int) -> Compiled:
    """Compile `setup` for a batch of `batch_size` rows.

    Parallel(a, b, ...) replicates the input batch once per child (done at the model input), after which
    it is exactly BatchSplit(a, b, ...) over the copies. Setups holding Fuse, Split or Average keep their
    tree; their plan then routes only what flattens (prefix tuning never sits under those blocks).
    """
    setup = parse_composition(setup) if setup is not None else None
    if setup is None:
        return Compiled(None, None, 1)
    parallel = _find_parallel(setup)
    k = 1
    if parallel is not None:
        k = len(parallel.children)
        setup = _replace(setup, parallel, BatchSplit(*parallel.children, batch_sizes=[batch_size] * k))
    n = batch_size * k
    try:
        return Compiled(RowPlan(tuple(_flatten(setup, n)), replicate=k), None, k)
    except FlattenError:
        return Compiled(RowPlan(tuple(_flatten(setup, n, lenient=True)), replicate=k), setup, k)


def compile_plan(setup: AdapterCompositionBlock | str | None, batch_size: int) -> RowPlan | None:
    """The flat plan for `setup`, or None when it needs the tree interpreter."""
    compiled = compile_setup(setup, batch_size)
    return compiled.plan if compiled.tree is None else None


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
    batch_size: int
    head_setup: Any = None
    tree: AdapterCompositionBlock | None = None
    replicate: int = 1
    stash: dict[Any, Any] = field(default_factory=dict)
    prefix_states: dict[str, Any] = field(default_factory=dict)
    group_cache: dict[frozenset[str], Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

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

    @property
    def active(self) -> bool:
        return self.setup is not None


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make `ctx` the current context of this thread for the duration of one forward pass."""
    stack = ForwardContext._stack()
    stack.append(ctx)
    try:
        yield ctx
    finally:
        stack.pop()
