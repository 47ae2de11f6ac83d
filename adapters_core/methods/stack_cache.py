"""The model-wide cache of stacked adapter weights, bounded by bytes (with the slot pools' free rows).

A mixed batch runs same-shaped adapters as one batched matmul over their weights stacked into one
[S, in, out] tensor. Building that stack copies the weights, so inference keeps it across forward passes
while no weight changed. Those copies are memory the model holds beyond the adapters themselves: one
`StackCache` per model counts them, holds at most `limit` bytes (least recently used entries go first)
and tells a server how much it holds (`nbytes`), so a residency budget can include it. With slot pools on
(methods.slots) resident adapters are gathered from their pools and nothing is stacked for them; the same
limit then bounds the pools' free rows and the spare modules of deleted adapters (methods.spares, at most a
quarter of it), so stacks, free rows and spares together stay near `limit`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .slots import SlotPools
from .spares import SpareModules

__all__ = ["DEFAULT_STACK_CACHE_BYTES", "StackCache", "stack_params"]

#: The default bound: 64 MiB of stacked copies (a few hundred small adapters' worth), whatever their device.
DEFAULT_STACK_CACHE_BYTES = 64 * 2**20

Pair = tuple[torch.Tensor, torch.Tensor | None]


def stack_params(params: Sequence[Pair]) -> Pair:
    """(weights, biases) of several layers as [S, in, out] (transposed) and [S, out] (None without biases)."""
    # stacked already transposed: a contiguous [S, in, out] right operand is the fast bmm layout
    w_t = torch.stack([p[0].t() for p in params])
    biases = [p[1] for p in params]
    ref = next((b for b in biases if b is not None), None)
    if ref is None:
        return w_t, None
    # slots may mix biased and bias-free layers (phm_bias=False): the latter add zero
    return w_t, torch.stack([torch.zeros_like(ref) if b is None else b for b in biases])


def _nbytes(value: Pair) -> int:
    return sum(t.numel() * t.element_size() for t in value if t is not None)


@dataclass(frozen=True)
class _Entry:
    stamp: tuple[tuple[int, int], ...]
    value: Pair
    nbytes: int


class StackCache:
    """Stacked weights of groups of adapters, shared by every site of one model, at most `limit` bytes.

    Only used when no gradient is recorded. An entry is keyed by its parameters' identities and stamped with
    their storage and in-place version counters, so a reload or an optimizer step invalidates it; computed
    weights (Compacter's PHM products) are never kept. Thread-safe: forward passes on several threads share it.
    """

    def __init__(self, limit: int = DEFAULT_STACK_CACHE_BYTES, slots: SlotPools | None = None) -> None:
        self.slots = slots if slots is not None else SlotPools()
        self.spares = SpareModules()
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._nbytes = 0
        self._limit = 0
        self._lock = threading.Lock()
        self.set_limit(limit)

    @property
    def nbytes(self) -> int:
        """Bytes of stacked weights held now."""
        return self._nbytes

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, nbytes: int) -> None:
        """Hold at most `nbytes` from now on (0 keeps nothing); evicts least recently used entries at once."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"the stack cache limit must be a number of bytes >= 0, got {nbytes!r}")
        with self._lock:
            self._limit = nbytes
            self.slots.slack_limit = nbytes
            self.spares.limit_bytes = nbytes // 4
            self._evict(0)

    def get(self, params: Sequence[Pair]) -> Pair:
        """The stacked (weights, biases) of `params`, from the cache when they are unchanged."""
        flat = [t for pair in params for t in pair if t is not None]
        if any(not isinstance(t, nn.Parameter) for t in flat):
            return stack_params(params)  # computed per forward (Compacter's PHM products): nothing to keep
        key = tuple(id(t) for t in flat)
        stamp = tuple((t.data_ptr(), t._version) for t in flat)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit.stamp == stamp:
                self._entries.move_to_end(key)
                return hit.value
        value = stack_params(params)
        entry = _Entry(stamp, value, _nbytes(value))
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            if entry.nbytes + self._others() <= self._limit:
                self._evict(entry.nbytes)
                self._entries[key] = entry
                self._nbytes += entry.nbytes
        return value

    def gather(self, params: Sequence[Pair], row_slot: torch.Tensor | None) -> Pair:
        """The stacked (weights, biases) of `params` with row r taken from member row_slot[r] (None: the members
        in order): one index_select from the slot pools when they all live there, else the cached stack."""
        hit = self.slots.gather(params, row_slot)
        if hit is not None:
            return hit
        w_t, b = self.get(params)
        if row_slot is None:
            return w_t, b
        return w_t[row_slot], None if b is None else b[row_slot]

    def forget(self, tensors: Iterable[torch.Tensor]) -> None:
        """Drop every entry that stacks one of `tensors` (an adapter being deleted)."""
        ids = {id(t) for t in tensors}
        with self._lock:
            for key in [k for k in self._entries if ids.intersection(k)]:
                self._nbytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def _others(self) -> int:
        """Bytes that share the bound with the stacks: the slot pools' free rows and the spare modules."""
        return self.slots.free_nbytes + self.spares.nbytes

    def _evict(self, room: int) -> None:
        """Evict least recently used entries until `room` more bytes fit under the limit (lock held)."""
        spare = self._others()
        while self._entries and self._nbytes + room + spare > self._limit:
            _, entry = self._entries.popitem(last=False)
            self._nbytes -= entry.nbytes
