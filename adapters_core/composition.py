"""Composition blocks (Stack, Fuse, Split, BatchSplit, Parallel, Average), parsing and validation.

Blocks are plain immutable values: hashable, comparable and printable as the code that builds
them, e.g. ``BatchSplit('a', Stack('b', 'c'), batch_sizes=[3, 5])``. A child is an adapter name
(``str``) or another block. Constructors check only the block's own arguments; which blocks may
nest in which (``ALLOWED_NESTING``) and which methods honour which blocks (``SUPPORTED_BLOCKS``)
are checked by :func:`parse_composition` and :func:`validate_composition`, before any tensor is
touched.

Depends on nothing but the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

__all__ = [
    "ALLOWED_NESTING",
    "METHOD_KINDS",
    "SUPPORTED_BLOCKS",
    "AdapterCompositionBlock",
    "Average",
    "BatchSplit",
    "Fuse",
    "Parallel",
    "Split",
    "Stack",
    "check_nesting",
    "composition_from_json",
    "composition_to_json",
    "parse_composition",
    "validate_composition",
]


class AdapterCompositionBlock:
    """Base of all blocks: an ordered tuple of children plus block-specific parameters."""

    __slots__ = ("children",)
    children: tuple[str | AdapterCompositionBlock, ...]

    #: Key of this block in the HTTP API's JSON form (see :func:`composition_from_json`).
    json_key: ClassVar[str] = ""
    #: Whether a child may be None, meaning "these rows run the bare backbone" (BatchSplit only).
    allows_base_rows: ClassVar[bool] = False

    def __init__(self, *children: str | AdapterCompositionBlock) -> None:
        if not children:
            raise ValueError(f"{type(self).__name__} needs at least one child")
        for child in children:
            if child is None and type(self).allows_base_rows:
                continue
            if isinstance(child, str):
                if not child:
                    raise ValueError(f"{type(self).__name__}: an adapter name must not be empty")
            elif not isinstance(child, AdapterCompositionBlock):
                raise ValueError(
                    f"{type(self).__name__}: a child must be an adapter name or a block, got {child!r}"
                )
        object.__setattr__(self, "children", tuple(children))

    # -- immutability ---------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        # Slots plus a raising __setattr__ defeat the default pickling; rebuild via the constructor.
        return (_rebuild, (type(self), self.children, self._repr_params()))

    # -- parameters (overridden by blocks that have some) ---------------------------------------
    def params(self) -> dict[str, Any]:
        """Block parameters as keyword arguments (lists, as the constructor takes them)."""
        return {}

    def _repr_params(self) -> dict[str, Any]:
        return self.params()

    # -- value semantics ------------------------------------------------------------------------
    def _key(self) -> tuple[Any, ...]:
        return (type(self), self.children, tuple(sorted((k, _hashable(v)) for k, v in self.params().items())))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AdapterCompositionBlock):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        parts = [repr(c) for c in self.children]
        parts += [f"{k}={v!r}" for k, v in self._repr_params().items()]
        return f"{type(self).__name__}({', '.join(parts)})"

    # -- sequence protocol over children --------------------------------------------------------
    def __iter__(self) -> Iterator[str | AdapterCompositionBlock]:
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)

    def __getitem__(self, index: int) -> str | AdapterCompositionBlock:
        return self.children[index]

    # -- leaves ---------------------------------------------------------------------------------
    def flatten(self) -> tuple[str, ...]:
        """All adapter names in the block, depth-first, each once, in first-seen order."""
        seen: dict[str, None] = {}
        for child in self.children:
            if child is None:
                continue
            for name in (child,) if isinstance(child, str) else child.flatten():
                seen.setdefault(name, None)
        return tuple(seen)

    def first(self) -> str:
        """The first adapter name (depth-first)."""
        child = next(c for c in self.children if c is not None)
        return child if isinstance(child, str) else child.first()

    def last(self) -> str:
        """The last adapter name (depth-first)."""
        child = next(c for c in reversed(self.children) if c is not None)
        return child if isinstance(child, str) else child.last()


def _rebuild(
    cls: type[AdapterCompositionBlock], children: tuple[Any, ...], params: dict[str, Any]
) -> AdapterCompositionBlock:
    return cls(*children, **params)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _int_list(block: str, name: str, values: Sequence[int] | int, n: int, minimum: int) -> tuple[int, ...]:
    """Checks a per-child size list (an int means the same size for every child)."""
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values] * n
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ValueError(f"{block}: {name} must be a list of ints, got {values!r}")
    out = tuple(values)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in out):
        raise ValueError(f"{block}: {name} must be a list of ints, got {list(out)!r}")
    if len(out) != n:
        raise ValueError(f"{block}: {name}={list(out)!r} has {len(out)} entries for {n} children")
    if any(v < minimum for v in out):
        raise ValueError(f"{block}: {name}={list(out)!r} must all be >= {minimum}")
    return out


class Stack(AdapterCompositionBlock):
    """Apply the children in order: the output of one feeds the next."""

    __slots__ = ()
    json_key = "stack"


class Parallel(AdapterCompositionBlock):
    """Replicate the batch once per child; each child (and its head) sees its own copy."""

    __slots__ = ()
    json_key = "parallel"


class Fuse(AdapterCompositionBlock):
    """AdapterFusion attention over the children's outputs (bottleneck adapters only).

    ``name`` names the fusion layer; by default the children's (last) names joined by ``","``.
    """

    __slots__ = ("_name",)
    json_key = "fuse"

    def __init__(self, *children: str | AdapterCompositionBlock, name: str | None = None) -> None:
        super().__init__(*children)
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"Fuse: name must be a non-empty string, got {name!r}")
        object.__setattr__(self, "_name", name)

    @property
    def name(self) -> str:
        """The fusion name: explicit, or the children's last names joined with ","."""
        if self._name is not None:
            return self._name
        return ",".join(c if isinstance(c, str) else c.last() for c in self.children)

    def params(self) -> dict[str, Any]:
        return {"name": self.name}

    def _repr_params(self) -> dict[str, Any]:
        return {} if self._name is None else {"name": self._name}


class Split(AdapterCompositionBlock):
    """Split the sequence: child i gets the next ``splits[i]`` positions (sum == sequence length)."""

    __slots__ = ("splits",)
    json_key = "split"
    splits: tuple[int, ...]

    def __init__(self, *children: str | AdapterCompositionBlock, splits: Sequence[int] | int) -> None:
        super().__init__(*children)
        object.__setattr__(self, "splits", _int_list("Split", "splits", splits, len(children), 1))

    def params(self) -> dict[str, Any]:
        return {"splits": list(self.splits)}


class BatchSplit(AdapterCompositionBlock):
    """Split the batch: child i gets the next ``batch_sizes[i]`` rows (sum == batch size)."""

    __slots__ = ("batch_sizes",)
    json_key = "batch_split"
    allows_base_rows = True
    batch_sizes: tuple[int, ...]

    def __init__(self, *children: str | AdapterCompositionBlock, batch_sizes: Sequence[int] | int) -> None:
        super().__init__(*children)
        object.__setattr__(
            self, "batch_sizes", _int_list("BatchSplit", "batch_sizes", batch_sizes, len(children), 0)
        )

    def params(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes)}


class Average(AdapterCompositionBlock):
    """Weighted average of the children's outputs; weights are normalised to sum to 1.

    Uniform when ``weights`` is None. (AdapterHub divides by the number of children once more; we
    do not copy that bug.)
    """

    __slots__ = ("weights",)
    json_key = "average"
    weights: tuple[float, ...]

    def __init__(
        self, *children: str | AdapterCompositionBlock, weights: Sequence[float] | None = None
    ) -> None:
        super().__init__(*children)
        n = len(children)
        if weights is None:
            norm = tuple(1.0 / n for _ in range(n))
        else:
            if isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
                raise ValueError(f"Average: weights must be a list of numbers, got {weights!r}")
            values = list(weights)
            if any(isinstance(w, bool) or not isinstance(w, int | float) for w in values):
                raise ValueError(f"Average: weights must be numbers, got {values!r}")
            if len(values) != n:
                raise ValueError(f"Average: weights={values!r} has {len(values)} entries for {n} children")
            if any(not math.isfinite(w) or w < 0 for w in values):
                raise ValueError(f"Average: weights={values!r} must be finite and >= 0")
            total = math.fsum(values)
            if total <= 0:
                raise ValueError(f"Average: weights={values!r} sum to {total}; they must sum to > 0")
            norm = tuple(float(w) / total for w in values)
        object.__setattr__(self, "weights", norm)

    def params(self) -> dict[str, Any]:
        return {"weights": list(self.weights)}


_ALL_BLOCKS: tuple[type[AdapterCompositionBlock], ...] = (Stack, Fuse, Split, BatchSplit, Parallel, Average)

#: Which children each block type may hold (AdapterHub's table; ``str`` is an adapter name).
ALLOWED_NESTING: Mapping[type[AdapterCompositionBlock], tuple[type, ...]] = MappingProxyType(
    {
        Stack: (str, Fuse, Split, Parallel, BatchSplit, Average),
        Fuse: (str, Stack),
        Split: (str, Split, Stack, BatchSplit, Average),
        Parallel: (str, Stack, BatchSplit, Average),
        BatchSplit: (str, Stack, Split, BatchSplit, Average),
        Average: (str, Stack, Split, BatchSplit),
    }
)

#: Which block types each method kind can honour (IA3 is "lora"; Compacter is "bottleneck").
SUPPORTED_BLOCKS: Mapping[str, frozenset[type[AdapterCompositionBlock]]] = MappingProxyType(
    {
        "bottleneck": frozenset(_ALL_BLOCKS),
        "prefix_tuning": frozenset({Stack, Parallel, BatchSplit}),
        "lora": frozenset({Stack, BatchSplit, Average, Parallel}),
    }
)
METHOD_KINDS: frozenset[str] = frozenset(SUPPORTED_BLOCKS)


def _type_label(t: type) -> str:
    return "adapter name" if t is str else t.__name__


def check_nesting(block: AdapterCompositionBlock) -> None:
    """Raises ValueError when a block holds a child type that ``ALLOWED_NESTING`` forbids."""
    allowed = ALLOWED_NESTING[type(block)]
    for child in block.children:
        if child is None and block.allows_base_rows:
            continue
        if type(child) not in allowed:
            raise ValueError(
                f"invalid nesting in {block!r}: {type(block).__name__} cannot hold {child!r}; "
                f"a {type(block).__name__} may hold: {', '.join(_type_label(t) for t in allowed)}"
            )
        if isinstance(child, AdapterCompositionBlock):
            check_nesting(child)


def parse_composition(
    setup: AdapterCompositionBlock | str | Sequence[str | AdapterCompositionBlock] | None,
) -> AdapterCompositionBlock | None:
    """Normalises a setup: None (or empty) -> None, a name -> Stack(name), a list -> Stack(*items).

    The result's nesting is checked.
    """
    if setup is None:
        return None
    if isinstance(setup, AdapterCompositionBlock):
        block = setup
    elif isinstance(setup, str):
        if not setup:
            return None
        block = Stack(setup)
    elif isinstance(setup, list | tuple):
        if not setup:
            return None
        block = Stack(*setup)
    else:
        raise ValueError(f"cannot parse an adapter setup from {type(setup).__name__}: {setup!r}")
    check_nesting(block)
    return block


# ---------------------------------------------------------------------------------------------------
# JSON form (HTTP API)
# ---------------------------------------------------------------------------------------------------

_BLOCK_BY_KEY: Mapping[str, type[AdapterCompositionBlock]] = MappingProxyType(
    {b.json_key: b for b in _ALL_BLOCKS}
)
_PARAM_KEYS: Mapping[type[AdapterCompositionBlock], tuple[tuple[str, bool], ...]] = MappingProxyType(
    {  # block -> ((param name, required), ...)
        Stack: (),
        Parallel: (),
        Fuse: (("name", False),),
        Average: (("weights", False),),
        BatchSplit: (("batch_sizes", True),),
        Split: (("splits", True),),
    }
)
_MAX_JSON_DEPTH = 16
_MAX_JSON_NODES = 1024


def composition_from_json(obj: Any) -> AdapterCompositionBlock:
    """Builds a block from the HTTP API's JSON form; bad shapes raise ValueError naming the path.

    Accepted: ``"a"`` or ``["a", "b"]`` (a stack), ``{"stack": [...]}``, ``{"fuse": [...], "name"?}``,
    ``{"parallel": [...]}``, ``{"average": [...], "weights"?}``, ``{"batch_split": [...],
    "batch_sizes": [...]}``, ``{"split": [...], "splits": [...]}``; children nest the same way (a
    list child is a Stack). Nesting rules are checked too.
    """
    counter = [0]
    result = _from_json(obj, "adapters", 0, counter)
    block = Stack(result) if isinstance(result, str) else result
    check_nesting(block)
    return block


def _from_json(obj: Any, path: str, depth: int, counter: list[int]) -> str | AdapterCompositionBlock:
    counter[0] += 1
    if depth > _MAX_JSON_DEPTH or counter[0] > _MAX_JSON_NODES:
        raise ValueError(
            f"{path}: composition too large (max depth {_MAX_JSON_DEPTH}, {_MAX_JSON_NODES} nodes)"
        )
    if obj is None and path.endswith("]") and ".batch_split[" in path:
        return None  # base-model rows
    if isinstance(obj, str):
        if not obj:
            raise ValueError(f"{path}: an adapter name must not be empty")
        return obj
    if isinstance(obj, list):
        return Stack(*_children_from_json(obj, path, depth, counter))
    if not isinstance(obj, dict):
        raise ValueError(
            f'{path}: expected an adapter name, a list or an object like {{"stack": [...]}}, '
            f"got {type(obj).__name__}"
        )
    block_keys = [k for k in obj if k in _BLOCK_BY_KEY]
    if len(block_keys) != 1:
        raise ValueError(
            f"{path}: an object needs exactly one block key out of {sorted(_BLOCK_BY_KEY)}, "
            f"got keys {sorted(map(str, obj))}"
        )
    key = block_keys[0]
    cls = _BLOCK_BY_KEY[key]
    params = dict(_PARAM_KEYS[cls])
    unknown = sorted(str(k) for k in obj if k != key and k not in params)
    if unknown:
        allowed = sorted(params) or "none"
        raise ValueError(f"{path}: unknown key(s) {unknown} for {key!r} (allowed parameters: {allowed})")
    missing = sorted(name for name, required in params.items() if required and name not in obj)
    if missing:
        raise ValueError(f"{path}: {key!r} needs {missing}")
    if not isinstance(obj[key], list):
        raise ValueError(f"{path}.{key}: must be a list of children, got {type(obj[key]).__name__}")
    children = _children_from_json(obj[key], f"{path}.{key}", depth, counter)
    kwargs = {name: obj[name] for name in params if name in obj}
    try:
        return cls(*children, **kwargs)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _children_from_json(items: list[Any], path: str, depth: int, counter: list[int]) -> list[Any]:
    if not items:
        raise ValueError(f"{path}: a block needs at least one child")
    return [_from_json(item, f"{path}[{i}]", depth + 1, counter) for i, item in enumerate(items)]


def composition_to_json(block: AdapterCompositionBlock | str) -> Any:
    """The inverse of :func:`composition_from_json` (a bare name stays a string)."""
    if block is None or isinstance(block, str):
        return block
    out: dict[str, Any] = {block.json_key: [composition_to_json(c) for c in block.children]}
    params = block._repr_params()
    out.update(params)
    return out


# ---------------------------------------------------------------------------------------------------
# Validation against the loaded adapters
# ---------------------------------------------------------------------------------------------------


def validate_composition(
    setup: AdapterCompositionBlock | str | Sequence[str | AdapterCompositionBlock] | None,
    adapter_methods: Mapping[str, Collection[str]],
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
) -> None:
    """Checks a setup before a forward pass; raises ValueError naming the block and the reason.

    ``adapter_methods`` maps each known adapter to its method kinds ("bottleneck",
    "prefix_tuning", "lora"). Checked: nesting, unknown names, ``batch_sizes`` against
    ``batch_size`` and ``splits`` against ``seq_len`` (when given; nested blocks are checked
    against the slice they receive), that a Parallel block (at most one) sits only at the top of the
    setup or in Stacks there, and that every adapter's methods support every block around it
    (``SUPPORTED_BLOCKS``; Fuse children must be bottleneck-only).
    """
    block = parse_composition(setup)
    if block is None:
        return
    check_nesting(block)
    parallels = _parallel_blocks(block)
    if len(parallels) > 1:
        raise ValueError(f"{block!r}: at most one Parallel block per setup is supported, found {len(parallels)}")
    _validate(block, (), adapter_methods, batch_size, seq_len)


def _parallel_blocks(block: AdapterCompositionBlock | str | None) -> list[Parallel]:
    if not isinstance(block, AdapterCompositionBlock):
        return []
    found = [b for c in block.children for b in _parallel_blocks(c)]
    return [block, *found] if isinstance(block, Parallel) else found


def _validate(
    block: AdapterCompositionBlock,
    ancestors: tuple[AdapterCompositionBlock, ...],
    adapter_methods: Mapping[str, Collection[str]],
    batch_size: int | None,
    seq_len: int | None,
) -> None:
    chain = (*ancestors, block)
    if isinstance(block, Parallel):
        outer = next((a for a in reversed(ancestors) if not isinstance(a, Stack)), None)
        if outer is not None:
            raise ValueError(
                f"{block!r} inside {outer!r}: a Parallel block replicates the whole batch, so it may only sit at "
                f"the top of the setup (alone or in a Stack there), not inside a {type(outer).__name__}"
            )
    if isinstance(block, BatchSplit) and batch_size is not None and sum(block.batch_sizes) != batch_size:
        raise ValueError(
            f"{block!r}: batch_sizes sum to {sum(block.batch_sizes)} but the batch it receives has "
            f"{batch_size} rows"
        )
    if isinstance(block, Split) and seq_len is not None and sum(block.splits) != seq_len:
        raise ValueError(
            f"{block!r}: splits sum to {sum(block.splits)} but the sequence it receives has {seq_len} positions"
        )
    rows = batch_size
    for i, child in enumerate(block.children):
        child_rows = rows
        child_len = seq_len
        if isinstance(block, BatchSplit):
            child_rows = block.batch_sizes[i]
        if isinstance(block, Split):
            child_len = block.splits[i]
        if child is None:
            continue
        if isinstance(child, str):
            _check_leaf(child, block, chain, adapter_methods)
        else:
            _validate(child, chain, adapter_methods, child_rows, child_len)
        if isinstance(block, Stack) and isinstance(child, Parallel) and rows is not None:
            rows *= len(child.children)  # later stack members see the replicated batch


def _check_leaf(
    name: str,
    parent: AdapterCompositionBlock,
    chain: tuple[AdapterCompositionBlock, ...],
    adapter_methods: Mapping[str, Collection[str]],
) -> None:
    if name not in adapter_methods:
        known = ", ".join(sorted(adapter_methods)) or "none"
        raise ValueError(f"{parent!r}: unknown adapter {name!r} (known adapters: {known})")
    kinds = set(adapter_methods[name])
    unknown_kinds = sorted(kinds - METHOD_KINDS)
    if unknown_kinds:
        raise ValueError(f"{parent!r}: adapter {name!r} has unknown method kind(s) {unknown_kinds}")
    for block in chain:
        if isinstance(block, Fuse) and kinds - {"bottleneck"}:
            raise ValueError(
                f"{block!r}: Fuse children must be bottleneck-only adapters, but {name!r} holds "
                f"{sorted(kinds)}"
            )
        for kind in sorted(kinds):
            if type(block) not in SUPPORTED_BLOCKS[kind]:
                supported = ", ".join(sorted(t.__name__ for t in SUPPORTED_BLOCKS[kind]))
                raise ValueError(
                    f"{block!r}: adapter {name!r} holds {kind}, which does not support "
                    f"{type(block).__name__} (it supports: {supported})"
                )
