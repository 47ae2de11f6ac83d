"""Resident adapter weights in stacked per-shape slot pools, so a mixed batch gathers by slot index.

A pool holds every resident tensor of one shape, dtype and device as the rows of one [capacity, *shape]
buffer; a weight [out, in] is kept transposed ([in, out], the right operand the batched matmuls read).
An adapter placed in the pools keeps its parameters as views of its rows: loading copies into free rows,
deleting frees them, and a mixed batch takes the rows it needs with one index_select instead of stacking
the weights of each new combination of adapters (no per-combination copy kept, none rebuilt).

A module opts in by defining `slot_parameters()`: the parameters its batched kernel stacks. A freed row
is reused first; a full pool grows (copying the buffer and re-pointing every resident view), by half its
capacity while the free rows of all pools stay under `slack_limit` bytes, else by a sixteenth of it (so a
pool is copied a few times per doubling, not at every load); when releases leave more than `slack_limit`
bytes free, the pool with the most free rows is compacted. So the pools hold the resident adapters' bytes
plus about `slack_limit` and a sixteenth of the pool that grew last. Enable the pools after the model has its
final device and dtype: a parameter given new storage later simply stops being read from its pool.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..routing import shared_tensor

__all__ = ["SlotPools"]

Pair = tuple[torch.Tensor, torch.Tensor | None]
PoolKey = tuple[tuple[int, ...], torch.dtype, torch.device]


def _row_shape(p: torch.Tensor) -> tuple[int, ...]:
    return (p.shape[1], p.shape[0]) if p.dim() == 2 else tuple(p.shape)


def _view(data: torch.Tensor, row: int, transposed: bool) -> torch.Tensor:
    return data[row].t() if transposed else data[row]


@dataclass
class _Pool:
    data: torch.Tensor  # [capacity, *row shape]
    transposed: bool
    owners: dict[int, nn.Parameter] = field(default_factory=dict)  # row -> the parameter viewing it
    free: list[int] = field(default_factory=list)  # freed rows below `top`, reused first

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    @property
    def top(self) -> int:
        """Rows [0, top) have been handed out at least once."""
        return len(self.owners) + len(self.free)


class SlotPools:
    """The model's slot pools (one per row shape, dtype and device). Off until `enabled` is set.

    Thread-safe for placing and releasing; gathers read a consistent buffer even while another thread grows
    a pool (the old buffer stays alive as long as a gather holds it).
    """

    def __init__(self, slack_limit: int = 16 * 2**20) -> None:
        self.enabled = False
        self.slack_limit = slack_limit
        self._pools: dict[PoolKey, _Pool] = {}
        self._where: dict[int, tuple[PoolKey, int]] = {}  # id(parameter) -> (pool, row)
        self._lock = threading.Lock()

    # -- placing ------------------------------------------------------------------------------------
    def place(self, params: Iterable[nn.Parameter]) -> None:
        """Copy each parameter into a free row of its pool and make it a view of that row."""
        with self._lock, torch.no_grad():
            for p in params:
                if id(p) in self._where or p.dim() not in (1, 2):
                    continue
                key = (_row_shape(p), p.dtype, p.device)
                pool = self._pools.get(key)
                if pool is None:
                    pool = self._pools[key] = _Pool(torch.empty((4, *key[0]), dtype=p.dtype, device=p.device), p.dim() == 2)
                row = pool.free.pop() if pool.free else self._next_row(pool)
                view = _view(pool.data, row, pool.transposed)
                view.copy_(p.data)
                p.data = view
                pool.owners[row] = p
                self._where[id(p)] = (key, row)

    def _next_row(self, pool: _Pool) -> int:
        row = pool.top
        if row == pool.capacity:
            room = (self.slack_limit - self._free_bytes()) // max(1, pool.row_bytes)
            # at least a sixteenth more: growing row by row copied (and re-pointed) the whole pool at every load
            step = max(4, pool.capacity // 16, min(pool.capacity // 2, room))
            self._resize(pool, pool.capacity + step)
        return row

    def _resize(self, pool: _Pool, capacity: int, rows: list[int] | None = None) -> None:
        """Give `pool` a new buffer of `capacity` rows holding its owners' rows (at `rows` order when
        compacting, else where they are) and re-point every owner's view."""
        data = torch.empty((capacity, *pool.data.shape[1:]), dtype=pool.data.dtype, device=pool.data.device)
        if rows is None:
            data[: pool.top].copy_(pool.data[: pool.top])
            moved = dict(pool.owners)
        else:
            if rows:
                data[: len(rows)].copy_(pool.data[torch.tensor(rows, device=pool.data.device)])
            moved = {new: pool.owners[old] for new, old in enumerate(rows)}
            pool.free.clear()
            for new, p in moved.items():
                self._where[id(p)] = (self._where[id(p)][0], new)
        pool.data = data
        pool.owners = moved
        views = (data.transpose(1, 2) if pool.transposed else data).unbind(0)  # every row's view in one call
        for row, p in moved.items():
            p.data = views[row]

    def _free_bytes(self) -> int:
        return sum((p.capacity - len(p.owners)) * p.row_bytes for p in self._pools.values())

    def release(self, params: Iterable[nn.Parameter]) -> None:
        """Free the rows of these parameters (each keeps a private copy of its values)."""
        with self._lock, torch.no_grad():
            for p in params:
                where = self._where.pop(id(p), None)
                if where is None:
                    continue
                pool = self._pools[where[0]]
                row = where[1]
                if pool.owners.get(row) is p:
                    del pool.owners[row]
                    pool.free.append(row)
                    p.data = p.data.clone()
                if not pool.owners:
                    del self._pools[where[0]]
            if self._free_bytes() > self.slack_limit and self._pools:
                pool = max(self._pools.values(), key=lambda q: (q.capacity - len(q.owners)) * q.row_bytes)
                self._resize(pool, max(1, len(pool.owners)), sorted(pool.owners))

    # -- reading ------------------------------------------------------------------------------------
    def row_of(self, p: torch.Tensor) -> tuple[_Pool, int] | None:
        """The pool and row a parameter views, or None (not placed, or its storage was replaced since)."""
        where = self._where.get(id(p))
        if where is None:
            return None
        pool = self._pools.get(where[0])
        if pool is None or pool.owners.get(where[1]) is not p:
            return None
        if p.data_ptr() != pool.data[where[1]].data_ptr():
            return None  # someone gave the parameter new storage (model.to(...), load_state_dict(assign=True))
        return pool, where[1]

    def _rows(self, tensors: Sequence[torch.Tensor]) -> tuple[_Pool, list[int]] | None:
        pool: _Pool | None = None
        rows: list[int] = []
        for t in tensors:
            hit = self.row_of(t) if isinstance(t, nn.Parameter) else None
            if hit is None or (pool is not None and hit[0] is not pool):
                return None
            pool = hit[0]
            rows.append(hit[1])
        return None if pool is None else (pool, rows)

    def gather(self, params: Sequence[Pair], row_slot: torch.Tensor | None) -> Pair | None:
        """The stacked (weights [R, in, out], biases [R, out] or None) of `params`, row r taken from member
        row_slot[r] (None: one row per member, in order), straight from the pools; None when any tensor is
        not resident in one pool (the caller stacks them itself)."""
        if not self.enabled:
            return None
        weights = self._rows([w for w, _ in params])
        if weights is None or not weights[0].transposed:
            return None
        biases = [b for _, b in params]
        if all(b is None for b in biases):
            bias_rows = None
        elif any(b is None for b in biases) or (bias_rows := self._rows(biases)) is None:  # type: ignore[arg-type]
            return None
        w_pool, w_rows = weights
        w = w_pool.data.index_select(0, _index(w_rows, row_slot, w_pool.data.device))
        if bias_rows is None:
            return w, None
        b_pool, b_rows = bias_rows
        return w, b_pool.data.index_select(0, _index(b_rows, row_slot, b_pool.data.device))

    # -- accounting ---------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes the pools hold, free rows included."""
        with self._lock:
            return sum(p.data.numel() * p.data.element_size() for p in self._pools.values())

    @property
    def free_nbytes(self) -> int:
        """Bytes of rows no adapter holds now (the pools' overhead over the adapters they hold)."""
        with self._lock:
            return self._free_bytes()

    def stats(self) -> dict[str, int]:
        """Pools, rows held and rows allocated: for tests and metrics."""
        with self._lock:
            return {"pools": len(self._pools), "rows": sum(len(p.owners) for p in self._pools.values()),
                    "capacity": sum(p.capacity for p in self._pools.values())}


def _index(rows: list[int], row_slot: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    idx = shared_tensor(rows, device)
    return idx if row_slot is None else idx.index_select(0, row_slot)
