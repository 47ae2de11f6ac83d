"""Thread-local contexts: AdapterSetup (which adapters and heads a forward pass uses).

``with AdapterSetup(setup):`` overrides the model's statically active adapters for the code in the
block, on this thread only. Contexts nest (the innermost wins) and unwind on exceptions. The stack
is per thread (``threading.local``), matching the server, which runs each forward pass on one
inference thread; asyncio tasks sharing a thread would share it.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any, ClassVar

from .composition import (
    AdapterCompositionBlock,
    BatchSplit,
    Parallel,
    Stack,
    parse_composition,
)

__all__ = ["AdapterSetup", "default_head_setup"]

HeadSetup = str | AdapterCompositionBlock | None


def _child_head(child: str | AdapterCompositionBlock) -> str | AdapterCompositionBlock:
    """The head for one branch of a Parallel/BatchSplit: its own default, else its last adapter."""
    if child is None or isinstance(child, str):
        return child
    head = default_head_setup(child)
    return head if head is not None else child.last()


def default_head_setup(setup: str | AdapterCompositionBlock | None) -> HeadSetup:
    """The prediction head(s) implied by an adapter setup.

    - a name -> that name; Stack -> the head of its last child;
    - Parallel -> Parallel of each child's head; BatchSplit -> BatchSplit of each child's head with
      the same batch_sizes (a child's head is its own default, else its last adapter name, so a
      nested BatchSplit keeps its rows' heads instead of collapsing to one name as AdapterHub does);
    - Fuse, Average, Split -> None, as in AdapterHub (``parse_heads_from_composition``): no head is
      implied and the model's active head applies.
    """
    if setup is None or isinstance(setup, str):
        return setup
    if isinstance(setup, Stack):
        return default_head_setup(setup.children[-1])
    if isinstance(setup, Parallel):
        return Parallel(*(_child_head(c) for c in setup.children))
    if isinstance(setup, BatchSplit):
        return BatchSplit(*(_child_head(c) for c in setup.children), batch_sizes=list(setup.batch_sizes))
    return None


class AdapterSetup:
    """Context manager that activates an adapter setup (and heads) for the current thread.

    ``setup`` is anything :func:`parse_composition` takes (a name, a list, a block, or None for
    "no adapters"). ``head_setup`` defaults to :func:`default_head_setup`. With
    ``ignore_empty=True`` an empty setup (and no head_setup) makes entering a no-op, so an outer
    context or the static setup stays in force.
    """

    _storage: ClassVar[threading.local] = threading.local()

    def __init__(
        self,
        setup: Any,
        head_setup: str | AdapterCompositionBlock | None = None,
        ignore_empty: bool = False,
    ) -> None:
        if head_setup is not None and not isinstance(head_setup, str | AdapterCompositionBlock):
            raise ValueError(f"head_setup must be a head name or a block, got {head_setup!r}")
        self._adapter_setup = parse_composition(setup)
        self._head_setup = head_setup
        self._empty = ignore_empty and self._adapter_setup is None and head_setup is None

    @property
    def adapter_setup(self) -> AdapterCompositionBlock | None:
        """The parsed adapter setup (None: no adapters)."""
        return self._adapter_setup

    @property
    def head_setup(self) -> HeadSetup:
        """The explicit head setup, or the default implied by the adapter setup."""
        if self._head_setup is not None:
            return self._head_setup
        return default_head_setup(self._adapter_setup)

    def __repr__(self) -> str:
        return f"AdapterSetup({self._adapter_setup!r}, head_setup={self.head_setup!r})"

    # -- the thread-local stack -----------------------------------------------------------------
    @classmethod
    def _stack(cls) -> list[AdapterSetup]:
        stack = getattr(cls._storage, "stack", None)
        if stack is None:
            stack = []
            cls._storage.stack = stack
        return stack

    def __enter__(self) -> AdapterSetup:
        if not self._empty:
            AdapterSetup._stack().append(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._empty:
            return
        stack = AdapterSetup._stack()
        if not stack or stack[-1] is not self:
            raise RuntimeError("AdapterSetup exited out of order (or on another thread than it was entered)")
        stack.pop()

    @classmethod
    def get_context(cls) -> AdapterSetup | None:
        """The innermost AdapterSetup entered on this thread, or None."""
        stack = AdapterSetup._stack()
        return stack[-1] if stack else None

    @classmethod
    def get_context_adapter_setup(cls) -> AdapterCompositionBlock | None:
        """The innermost context's adapter setup, or None when no context is active."""
        context = cls.get_context()
        return context.adapter_setup if context is not None else None

    @classmethod
    def get_context_head_setup(cls) -> HeadSetup:
        """The innermost context's head setup, or None when no context is active."""
        context = cls.get_context()
        return context.head_setup if context is not None else None

