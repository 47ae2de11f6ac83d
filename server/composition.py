"""Resolve a request's adapter composition: user names -> stored versions -> a block over model names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapters_core.composition import (
    AdapterCompositionBlock,
    Fuse,
    Parallel,
    Stack,
    composition_from_json,
    composition_to_json,
    validate_composition,
)
from server.problems import ProblemError
from server.store import VersionMeta

MAX_ADAPTERS_PER_REQUEST = 16

Lookup = Callable[[str], VersionMeta | None]


@dataclass(frozen=True)
class Resolved:
    """A composition pinned to exact stored versions (so a hot swap never changes a queued request)."""

    block: AdapterCompositionBlock | str  # over internal (model-side) names
    metas: tuple[VersionMeta, ...]  # every adapter it uses, each once
    head: VersionMeta | None  # whose classification head produces the result, if any
    solo: bool  # cannot share a forward pass with other requests (Parallel replicates the batch)

    @property
    def key(self) -> str:
        """Identity of the composition, for grouping rows and counting distinct adapters per batch."""
        return repr(self.block)

    @property
    def parallel_width(self) -> int:
        return len(self.block.children) if isinstance(self.block, Parallel) else 1


def _rename(obj: Any, names: dict[str, str]) -> Any:
    if isinstance(obj, str):
        return names[obj]
    if isinstance(obj, list):
        return [_rename(o, names) for o in obj]
    if isinstance(obj, dict):
        return {k: (_rename(v, names) if isinstance(v, list | str) and k != "name" else v) for k, v in obj.items()}
    return obj


def _contains_parallel(block: AdapterCompositionBlock | str) -> bool:
    if isinstance(block, str):
        return False
    return isinstance(block, Parallel) or any(_contains_parallel(c) for c in block.children)


def batchable(block: AdapterCompositionBlock | str) -> AdapterCompositionBlock | str:
    """The form of a request's block that can sit inside a BatchSplit (Fuse needs a Stack around it)."""
    return Stack(block) if isinstance(block, Fuse) else block


def resolve(spec: Any, lookup: Lookup, head: str | None, task: str) -> Resolved:
    """Parse and validate the JSON composition; 404 for unknown adapters, 422 for invalid ones."""
    try:
        user_block = composition_from_json(spec)
    except ValueError as exc:
        raise ProblemError(422, "invalid-composition", str(exc)) from None
    names = list(user_block.flatten())
    if len(names) > MAX_ADAPTERS_PER_REQUEST:
        raise ProblemError(422, "invalid-composition", f"a composition may use at most {MAX_ADAPTERS_PER_REQUEST} adapters")
    metas: dict[str, VersionMeta] = {}
    for name in names:
        meta = lookup(name)
        if meta is None:
            raise ProblemError(404, "unknown-adapter", f"no adapter named {name!r} for this tenant")
        metas[name] = meta
    try:
        validate_composition(user_block, {n: m.methods for n, m in metas.items()})
    except ValueError as exc:
        raise ProblemError(422, "invalid-composition", str(exc)) from None
    internal = {n: m.internal for n, m in metas.items()}
    block: AdapterCompositionBlock | str = composition_from_json(_rename(composition_to_json(user_block), internal))
    if isinstance(block, Stack) and len(block.children) == 1 and isinstance(block.children[0], str):
        block = block.children[0]
    head_meta = _pick_head(user_block, metas, head, task)
    return Resolved(block, tuple(metas.values()), head_meta, _contains_parallel(block))


def _pick_head(
    block: AdapterCompositionBlock, metas: dict[str, VersionMeta], head: str | None, task: str
) -> VersionMeta | None:
    if task == "embedding":
        if head is not None:
            raise ProblemError(422, "invalid-head", "`head` cannot be combined with task 'embedding'")
        return None
    if head is not None:
        meta = metas.get(head)
        if meta is None:
            raise ProblemError(422, "invalid-head", f"head {head!r} must name an adapter used in the composition")
        if not meta.has_head:
            raise ProblemError(422, "invalid-head", f"adapter {head!r} has no prediction head")
        return meta
    if isinstance(block, Parallel):
        if task == "classification":
            raise ProblemError(422, "invalid-head", "classification with a parallel composition is not supported")
        return None
    last = metas[block.last()]
    if last.has_head:
        return last
    if task == "classification":
        raise ProblemError(422, "invalid-head", f"adapter {block.last()!r} has no prediction head; pass `head` or use task 'embedding'")
    return None
