"""Resolve a request's adapter composition: user names -> stored versions -> a block over model names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adapters_core.composition import (
    AdapterCompositionBlock,
    Fuse,
    Parallel,
    Stack,
    composition_from_json,
    validate_composition,
)
from server.errors import InvalidComposition, InvalidHead, StaleFusion, UnknownAdapter
from server.registry.store import VersionMeta
from server.scheduling.cost import SINGLE, Limits, Shape, check_shape, shape_of

MAX_ADAPTERS_PER_REQUEST = 16

Lookup = Callable[[str], VersionMeta | None]


@dataclass(frozen=True)
class FusionLookup:
    """How a request's Fuse blocks find an uploaded AdapterFusion and the adapter versions it was made for."""

    over: Callable[[tuple[str, ...]], VersionMeta | None]  # the fusion over exactly these adapters, in order
    version: Callable[[str, str, int], VersionMeta | None]  # (tenant, name, version) -> that stored version


@dataclass(frozen=True)
class Resolved:
    """A composition pinned to exact stored versions (so a hot swap never changes a queued request)."""

    block: AdapterCompositionBlock | str  # over internal (model-side) names
    metas: tuple[VersionMeta, ...]  # every adapter it uses, each once
    head: VersionMeta | None  # whose classification head produces the result, if any
    solo: bool  # cannot share a forward pass with other requests (Parallel replicates the batch)
    shape: Shape = field(default=SINGLE)  # depth, width and adapter applications (server.scheduling.cost)

    @property
    def key(self) -> str:
        """Identity of the composition: jobs with equal keys are made adjacent, so their rows share one segment."""
        return repr(self.block)

    @property
    def parallel_width(self) -> int:
        return len(self.block.children) if isinstance(self.block, Parallel) else 1


FusedUse = tuple[VersionMeta, list[VersionMeta]]  # an AdapterFusion and the adapter versions it fuses


Child = AdapterCompositionBlock | str | None  # None: BatchSplit rows that run the bare backbone


def rename(block: Child, name: Callable[[str], str], fuse: Callable[[Fuse], Child] | None = None) -> Child:
    """The same composition over other adapter names: every block is rebuilt from its renamed children with
    its own parameters (splits, batch_sizes, weights). A Fuse becomes what `fuse` makes of it when given;
    otherwise it keeps an explicit fusion name, and a default name follows its renamed children."""
    if block is None:
        return None
    if isinstance(block, str):
        return name(block)
    if isinstance(block, Fuse):
        if fuse is not None:
            return fuse(block)
        explicit = block.name if block.name != Fuse(*block.children).name else None
        return Fuse(*(rename(c, name, fuse) for c in block.children), name=explicit)
    return type(block)(*(rename(c, name, fuse) for c in block.children), **block.params())


def _fuse_blocks(block: Child) -> list[Fuse]:
    if block is None or isinstance(block, str):
        return []
    own = [block] if isinstance(block, Fuse) else []
    return own + [f for c in block.children for f in _fuse_blocks(c)]


def _find_fusion(fuse: Fuse, lookup: Lookup, fusions: FusionLookup | None) -> FusedUse:
    """The uploaded AdapterFusion a Fuse block means (by its explicit name, else over its adapters) and the
    adapter versions it was made for; UnknownAdapter or InvalidComposition naming what is missing."""
    children = fuse.children
    if not all(isinstance(c, str) for c in children):
        raise InvalidComposition("a fuse block must list adapter names (fusing nested blocks is not supported)")
    default = ",".join(children)
    if fusions is None:
        raise InvalidComposition(f"no AdapterFusion over {list(children)} can be used here")
    if fuse.name != default:
        meta = lookup(fuse.name)
        if meta is None:
            raise UnknownAdapter(f"no AdapterFusion named {fuse.name!r} for this tenant")
        if meta.method != "fusion":
            raise InvalidComposition(f"{fuse.name!r} is not an AdapterFusion (it is a {meta.method} adapter)")
    else:
        meta = fusions.over(tuple(children))
        if meta is None:
            raise InvalidComposition(
                f"no AdapterFusion over {list(children)} has been uploaded; upload one (adapter_fusion_config.json and "
                "model_adapter_fusion.safetensors), then use {\"fuse\": [...]} or {\"fuse\": [...], \"name\": ...}",
            )
    fused_names = [f["name"] for f in meta.fused]
    if fused_names != list(children):
        raise InvalidComposition(f"AdapterFusion {meta.name!r} fuses {fused_names}, not {list(children)}")
    members = []
    for f in meta.fused:
        member = fusions.version(f["tenant"], f["name"], int(f["version"]))
        if member is None or member.internal != f["internal"]:
            raise StaleFusion(
                f"AdapterFusion {meta.name!r} was made for version {f['version']} of {f['name']!r}, which is gone; upload the fusion again",
            )
        members.append(member)
    return meta, members


def _contains_parallel(block: Child) -> bool:
    if block is None or isinstance(block, str):
        return False
    return isinstance(block, Parallel) or any(_contains_parallel(c) for c in block.children)


def resolve(spec: Any, lookup: Lookup, head: str | None, task: str, fusions: FusionLookup | None = None,
            limits: Limits | None = None) -> Resolved:
    """Parse and validate the JSON composition (UnknownAdapter, InvalidComposition or InvalidHead when it is wrong;
    OverLimit when its shape exceeds `limits`, checked before any adapter is looked up). A fuse block uses the
    uploaded AdapterFusion over its adapters, with the adapter versions it was made for."""
    try:
        user_block = composition_from_json(spec)
    except ValueError as exc:
        raise InvalidComposition(str(exc)) from None
    except OverflowError as exc:  # an average's weights beyond a float (1e308 twice, a 4000-digit integer)
        raise InvalidComposition(
            f"average weights must be finite numbers >= 0 with a positive sum that fits a float (below 1.8e308): {exc}"
        ) from None
    shape = shape_of(user_block)
    if limits is not None:
        check_shape(shape, limits)
    names = list(user_block.flatten())
    if len(names) > MAX_ADAPTERS_PER_REQUEST:
        raise InvalidComposition(f"a composition may use at most {MAX_ADAPTERS_PER_REQUEST} adapters")
    metas: dict[str, VersionMeta] = {}
    for name in names:
        meta = lookup(name)
        if meta is None:
            raise UnknownAdapter(f"no adapter named {name!r} for this tenant")
        if meta.method == "fusion":
            raise InvalidComposition(
                f"{name!r} is an AdapterFusion; use it as {{\"fuse\": {[f['name'] for f in meta.fused]}, \"name\": \"{name}\"}}",
            )
        metas[name] = meta
    try:
        validate_composition(user_block, {n: m.methods for n, m in metas.items()})
    except ValueError as exc:
        raise InvalidComposition(str(exc)) from None
    fused = {f: _find_fusion(f, lookup, fusions) for f in _fuse_blocks(user_block)}

    def pinned(f: Fuse) -> Fuse:
        """A request's fuse block as the model holds it: the uploaded fusion over the versions it was made for."""
        fusion, members = fused[f]
        return Fuse(*(m.internal for m in members), name=fusion.internal)

    block = rename(user_block, lambda n: metas[n].internal, pinned)
    assert block is not None
    if isinstance(block, Stack) and len(block.children) == 1 and isinstance(block.children[0], str):
        block = block.children[0]
    head_meta = _pick_head(user_block, metas, head, task)
    # what the model must hold: the adapters the block names (a fuse block's pinned versions), then the fusions
    known = {m.internal: m for m in (*metas.values(), *(m for _, ms in fused.values() for m in ms))}
    used = [known[i] for i in dict.fromkeys(block.flatten() if not isinstance(block, str) else (block,))]
    used += list({f.internal: f for f, _ in fused.values()}.values())
    if head_meta is not None and head_meta.internal not in {m.internal for m in used}:
        used.append(head_meta)
    return Resolved(block, tuple(used), head_meta, _contains_parallel(block), shape)


def _pick_head(
    block: AdapterCompositionBlock, metas: dict[str, VersionMeta], head: str | None, task: str
) -> VersionMeta | None:
    if task == "embedding":
        if head is not None:
            raise InvalidHead("`head` cannot be combined with task 'embedding'")
        return None
    if head is not None:
        meta = metas.get(head)
        if meta is None:
            raise InvalidHead(f"head {head!r} must name an adapter used in the composition")
        if not meta.has_head:
            raise InvalidHead(f"adapter {head!r} has no prediction head")
        return meta
    if isinstance(block, Parallel):
        if task == "classification":
            raise InvalidHead("classification with a parallel composition is not supported")
        return None
    last = metas[block.last()]
    if last.has_head:
        return last
    if task == "classification":
        raise InvalidHead(f"adapter {block.last()!r} has no prediction head; pass `head` or use task 'embedding'")
    return None
