"""Spare adapter modules: what a deleted adapter leaves for the next load of the same shape.

A server with more adapters than fit its cache evicts and loads all the time, and building an adapter's
modules (nn.Module construction, random init that the load overwrites at once) was most of a cold load's
cost. With spares on, deleting an adapter keeps its modules, keyed by where they sat and what built them;
a load (never a plain `add_adapter`, which must initialise) that builds the same key takes one back instead
of constructing it, and the load then writes every parameter. The room's own bookkeeping (routing covers,
layer indices) runs as for a fresh module. The spares are bounded by the bytes of their parameters, oldest
dropped first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import nn

__all__ = ["SpareModules"]

M = TypeVar("M", bound=nn.Module)
_KEY_ATTR = "_adapterserve_spare_key"


_NBYTES_ATTR = "_adapterserve_spare_nbytes"


def _nbytes(module: nn.Module) -> int:
    """The bytes of a kept module's parameters, counted once when it was kept (its shape never changes)."""
    size = getattr(module, _NBYTES_ATTR, None)
    if size is None:
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        setattr(module, _NBYTES_ATTR, size)
    return int(size)


class SpareModules:
    """Modules of deleted adapters by build key, for loads on this host. Off until `enabled` is set."""

    def __init__(self, limit_bytes: int = 32 * 2**20) -> None:
        self.enabled = False
        self.limit_bytes = limit_bytes
        self._spares: OrderedDict[Hashable, list[nn.Module]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._loading = threading.local()
        self.reused = 0
        self.built = 0

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return sum(len(v) for v in self._spares.values())

    @contextmanager
    def loading(self) -> Iterator[None]:
        """On this thread, `build` may hand out spares: the caller writes every parameter afterwards."""
        previous = getattr(self._loading, "on", False)
        self._loading.on = True
        try:
            yield
        finally:
            self._loading.on = previous

    def build(self, key: Hashable, factory: Callable[..., M], *args: Any) -> M:
        """A spare built under `key` when loading with spares on, else `factory(*args)`; either way tagged with
        `key` so that `keep` can take it back. `key` must hold everything the module's shape depends on."""
        module: M | None = None
        if self.enabled and getattr(self._loading, "on", False):
            with self._lock:
                stack = self._spares.get(key)
                if stack:
                    module = stack.pop()  # type: ignore[assignment]
                    self._nbytes -= _nbytes(module)
                    if not stack:
                        del self._spares[key]
        if module is None:
            module = factory(*args)
            self.built += 1
        else:
            _refresh(module)
            self.reused += 1
        setattr(module, _KEY_ATTR, key)
        return module

    def keep(self, module: nn.Module | None) -> None:
        """Take back the module of an adapter being deleted (when spares are on and `build` made it)."""
        if module is None or not self.enabled or self.limit_bytes <= 0:
            return
        key = getattr(module, _KEY_ATTR, None)
        if key is None:
            return
        size = _nbytes(module)
        if size > self.limit_bytes:
            return
        with self._lock:
            self._spares.setdefault(key, []).append(module)
            self._spares.move_to_end(key)
            self._nbytes += size
            while self._nbytes > self.limit_bytes and self._spares:
                oldest = next(iter(self._spares))
                stack = self._spares[oldest]
                self._nbytes -= _nbytes(stack.pop(0))
                if not stack:
                    del self._spares[oldest]

    def clear(self) -> None:
        with self._lock:
            self._spares.clear()
            self._nbytes = 0


def _refresh(module: nn.Module) -> None:
    """A spare as a fresh module would be: trainable, no gradient, no cached result of its old weights."""
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                p.requires_grad_(True)
                p.grad = None
        reset = getattr(m, "reset_cached", None)
        if callable(reset):
            reset()
