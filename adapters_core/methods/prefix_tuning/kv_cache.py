"""Prefixes kept in a caller's own KV cache: written once per sequence instead of prepended at every forward.

`generate()` needs nothing of this: the attention wrapper prepends each row's prefix (after rotary
embedding) to the keys and values of every attention call, and HF's cache holds only the tokens. A decoder
that keeps its own per-row KV cache (the server's generation scheduler) can instead write a sequence's
prefix into the front of the sequence's cache row once, with `cached_prefix`, and run every later forward
under `prefixes_in_cache(rows)`: the wrapper then leaves those rows' prefixes out, since their keys and
values come back from the cache with the tokens', and the caller's mask shows them to every query.

What the caller keeps as AdapterHub and `generate()` do: prefix keys are not rotated (they are written as
the module gives them), and the sequence's tokens keep positions 0, 1, ... (position ids are the tokens'
own, not their cache columns). Mixed-adapter rows need nothing special: each row's prefix is as long as
its adapter's (or 0), the row's tokens follow it, and the per-row mask covers what the row holds. Made for
causal self-attention (location "self" of a decoder-only model): for marked rows the wrapper also skips what
it adds beside the keys, such as T5's relative position bias widened per row (bias.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ...routing import compile_setup
from .routing import ROOM, PrefixState


class PrefixCacheAPI:
    """cached_prefix and prefixes_in_cache (mixed into the adapter mixin; `self` is the model)."""

    def _prefix_state(self) -> PrefixState | None:
        state: PrefixState | None = self._host.rooms.get(ROOM)  # type: ignore[attr-defined]
        return state if state is not None and len(state.prefix_tunings) else None

    def cached_prefix(self, setup: Any, location: str = "self") -> torch.Tensor | None:
        """The prefix keys and values one sequence run under `setup` attends to before its first token.

        Returns [layers, 2 (key, value), n_kv_heads, P, head_dim], one entry per attention module of
        `location` in layer order (for a decoder-only model: HF's `layer_idx`), exactly what the attention
        wrapper would prepend (a Stack of prefixes concatenated as it concatenates them). None when the
        setup routes no prefix there, or when its prefix is not equally long in every layer (leave_out, or
        stacked prefixes over different layers): such a row is left to the wrapper, which prepends it at
        every forward as before (do not mark it in `prefixes_in_cache`).
        """
        state = self._prefix_state()
        if state is None or setup is None:
            return None
        compiled = compile_setup(setup, 1)
        if compiled.plan is None or compiled.replicate != 1:
            return None
        return state.sequence_prefix(location, compiled.plan.rows[0])

    @contextmanager
    def prefixes_in_cache(self, rows: Sequence[bool]) -> Iterator[None]:
        """For the forwards run inside, on this thread: row i's prefixes are already in the KV cache (`rows[i]`).

        The attention wrapper prepends nothing for those rows (rows without a prefix may be marked or not);
        `rows` counts the forward's rows. Nests; the previous marking is restored on exit.
        """
        state = self._prefix_state()
        if state is None:
            yield
            return
        previous = state.in_cache(tuple(bool(r) for r in rows))
        try:
            yield
        finally:
            state.in_cache(previous)
