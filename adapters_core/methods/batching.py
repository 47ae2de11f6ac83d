"""Rows of a mixed batch, grouped for the methods' batched kernels (shared by bottleneck and LoRA rooms).

A routing plan hands a site groups of (adapter stack, row indices). Inference updates a few long
contiguous runs of rows through slices (views, no gather); many short runs are cheaper as one gathered
batched matmul. These helpers turn row lists into either form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from ..routing import shared_tensor

__all__ = ["SEGMENT_MAX_RUNS", "row_index", "row_slices", "segment_runs"]

# Up to this many contiguous runs of rows per group of same-shaped adapters, inference updates each run
# through slices; beyond it (many adapters with a row or two each) one gathered bmm costs less than the
# per-run op overhead. A judgement between two measured ends on MiniLM: 6 LoRAs over 19 of 32 rows (slices
# about 6x cheaper per site) and 32 seq_bn adapters with one row each (gathered about 12% faster per pass).
SEGMENT_MAX_RUNS = 8

M = TypeVar("M")


def segment_runs(members: Sequence[tuple[M, Sequence[int]]], n_rows: int) -> list[tuple[M, list[slice | None]]] | None:
    """Each member's rows as contiguous runs, or None when they add up to more than SEGMENT_MAX_RUNS runs
    (then the gathered path is cheaper)."""
    runs = [(member, row_slices(rows, n_rows)) for member, rows in members]
    return runs if sum(len(slices) for _, slices in runs) <= SEGMENT_MAX_RUNS else None


def _all_in_order(rows: Sequence[int], n_rows: int) -> bool:
    return len(rows) == n_rows and all(r == i for i, r in enumerate(rows))


def row_slices(rows: Sequence[int], n_rows: int) -> list[slice | None]:
    """`rows` as contiguous runs (slices), or [None] when they are all rows in order."""
    if _all_in_order(rows, n_rows):
        return [None]
    runs: list[slice | None] = []
    start = prev = rows[0]
    for r in rows[1:]:
        if r != prev + 1:
            runs.append(slice(start, prev + 1))
            start = r
        prev = r
    runs.append(slice(start, prev + 1))
    return runs


def row_index(rows: Sequence[int], n_rows: int, device: torch.device) -> torch.Tensor | None:
    """Index tensor of `rows` (shared by the forward's layers), or None when they are simply all rows in order."""
    if _all_in_order(rows, n_rows):
        return None
    return shared_tensor(rows, device)
