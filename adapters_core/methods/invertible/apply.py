"""Which invertible adapter each row uses, and applying them to a mixed batch in one call.

AdapterHub applies the invertible adapter of ``active_setup.first()`` (the first adapter name, depth-first)
to the whole batch, if that adapter has one; otherwise none. Here the same rule holds per row: a row takes
the first adapter of the setup it runs under (``first_adapters``), so Stack/Fuse/Split/Average behave as in
AdapterHub, and under BatchSplit and Parallel each row (or copy) gets what its own branch alone would give.

``apply_invertible`` groups rows by adapter, runs each adapter once on its rows (contiguous runs as slices,
scattered rows through one gather and one scatter) and leaves rows without an invertible adapter untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ...composition import AdapterCompositionBlock, BatchSplit, Parallel, Stack, parse_composition
from ...routing import shared_tensor
from ..batching import row_slices
from .layer import InvertibleAdapter

#: Up to this many contiguous runs per adapter its rows are read and written as slices (views); beyond
#: it one index_select/index_copy costs less than the per-run op overhead.
MAX_RUNS = 8

RowSelection = tuple[slice, ...] | tuple[int, ...] | None


@dataclass(frozen=True)
class InvertibleRouting:
    """Rows grouped by invertible adapter: ``groups[i] = (name, rows)`` with rows None (all rows), a tuple
    of slices (contiguous runs) or a tuple of row indices. Build it once per forward pass: the embedding
    output and the LM head input have the same rows."""

    n_rows: int
    groups: tuple[tuple[str, RowSelection], ...]

    @classmethod
    def build(
        cls, rows: Sequence[str | None], present: Mapping[str, object] | None = None, max_runs: int = MAX_RUNS
    ) -> InvertibleRouting:
        """Group ``rows`` (row -> adapter name or None); names not in ``present`` count as None."""
        by_name: dict[str, list[int]] = {}
        for i, name in enumerate(rows):
            if name is not None and (present is None or name in present):
                by_name.setdefault(name, []).append(i)
        n = len(rows)
        return cls(n, tuple((name, _selection(idx, n, max_runs)) for name, idx in by_name.items()))


def _selection(idx: list[int], n: int, max_runs: int) -> RowSelection:
    runs = row_slices(idx, n)
    if runs == [None]:
        return None
    return tuple(r for r in runs if r is not None) if len(runs) <= max_runs else tuple(idx)


def apply_invertible(
    x: torch.Tensor,
    routing: InvertibleRouting | Sequence[str | None],
    modules: Mapping[str, InvertibleAdapter],
    rev: bool = False,
) -> torch.Tensor:
    """Each row of ``x`` (batch first) through its invertible adapter (``rev``: the inverse); rows routed
    to None or to a name without a module are returned unchanged. ``x`` itself is never modified."""
    if not isinstance(routing, InvertibleRouting):
        routing = InvertibleRouting.build(routing, modules)
    if routing.n_rows != x.shape[0]:
        raise ValueError(f"invertible routing covers {routing.n_rows} rows but the batch has {x.shape[0]}")
    groups = [(name, rows) for name, rows in routing.groups if name in modules]
    if not groups:
        return x
    if len(groups) == 1 and groups[0][1] is None:
        return modules[groups[0][0]](x, rev=rev)
    out = x.clone()
    for name, rows in groups:
        module = modules[name]
        if isinstance(rows[0], slice):
            for sl in rows:
                out[sl] = module(x[sl], rev=rev)
        else:
            index = shared_tensor(rows, x.device)
            out.index_copy_(0, index, module(x.index_select(0, index), rev=rev))
    return out


def first_adapters(setup: AdapterCompositionBlock | str | None, n_rows: int) -> tuple[str | None, ...]:
    """Row -> the first adapter of the setup that row runs under (None: no adapter).

    ``n_rows`` is the batch as the embeddings see it, i.e. after Parallel replicated it (k copies of the
    input batch, copy i running Parallel's child i).
    """
    block = parse_composition(setup) if setup is not None else None
    return tuple(_firsts(block, n_rows))


def _firsts(block: AdapterCompositionBlock | str | None, n: int) -> list[str | None]:
    if block is None:
        return [None] * n
    if isinstance(block, str):
        return [block] * n
    if isinstance(block, Stack):
        child = next((c for c in block.children if c is not None), None)
        return _firsts(child, n)
    if isinstance(block, BatchSplit):
        if sum(block.batch_sizes) != n:
            raise ValueError(f"{block!r}: batch_sizes sum to {sum(block.batch_sizes)} but the batch has {n} rows")
        out: list[str | None] = []
        for child, size in zip(block.children, block.batch_sizes, strict=True):
            out.extend(_firsts(child, size))
        return out
    if isinstance(block, Parallel):
        k = len(block.children)
        if n % k:
            raise ValueError(f"{block!r}: {n} rows are not {k} equal copies of the input batch")
        return [name for child in block.children for name in _firsts(child, n // k)]
    return [block.first()] * n


__all__ = ["MAX_RUNS", "InvertibleRouting", "apply_invertible", "first_adapters"]
