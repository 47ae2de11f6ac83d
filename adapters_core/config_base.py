"""Shared machinery of the frozen config classes (split out of ``adapters_core.configuration``).

``FrozenMap`` (an immutable, hashable mapping) and ``_FrozenConfig``, the base of every adapter and
AdapterFusion config: it normalises field values (lists to tuples, dicts to ``FrozenMap``), checks
them against the fields' type hints (configs come from untrusted JSON and strings), gives value
equality and hashing, and provides the ``to_dict``/``replace``/``_build`` helpers that read and
write AdapterHub's JSON. Public names are re-exported by ``adapters_core.configuration``; this
module depends on the standard library only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

__all__ = ["FrozenMap"]


class FrozenMap(Mapping[str, Any]):
    """An immutable, hashable ``str``-keyed mapping (used for per-layer reduction factors and extras)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_data", dict(data or {}))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self._data)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("FrozenMap is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        # Slots plus a raising __setattr__ defeat the default copying and pickling; rebuild via the constructor.
        return (FrozenMap, (self._data,))


def _freeze(value: Any) -> Any:
    """Deep-freezes JSON-like data: dicts become FrozenMap, lists become tuples."""
    if isinstance(value, Mapping):
        return FrozenMap({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _to_json(value: Any) -> Any:
    """Turns frozen values back into JSON-like data: mappings become dicts, tuples become lists."""
    if isinstance(value, _FrozenConfig):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# Type checking of field values (configs come from untrusted JSON and strings, so check everything)
# ---------------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _matches(value: Any, hint: Any) -> bool:
    """True when ``value`` fits the (simple) type hint; ints count as floats, bools as neither."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, tuple) and all(_matches(v, args[0]) for v in value)
    if origin is Mapping or hint is Mapping:
        return isinstance(value, Mapping)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"unsupported type hint {hint!r}")  # a programming error, not bad input


def _hint_has(hint: Any, kind: type) -> bool:
    """True when ``kind`` (tuple or Mapping) appears among the hint's alternatives."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_hint_has(arg, kind) for arg in typing.get_args(hint))
    return typing.get_origin(hint) is kind or hint is kind


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


# ---------------------------------------------------------------------------------------------------
# Common base: frozen, value-compared, JSON round-tripping
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, kw_only=True)
class _FrozenConfig:
    """Shared machinery: normalisation and type checks, value equality, ``to_dict``/``replace``."""

    #: Keys found in a foreign file that no field knows (kept so a round trip preserves them).
    extra: Mapping[str, Any] = field(default_factory=FrozenMap, repr=False, compare=False)

    #: Whether ``to_dict`` writes the ``architecture`` class attribute (AdapterHub's layout).
    _writes_architecture: ClassVar[bool] = False
    architecture: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            hint = hints[f.name]
            if f.name == "extra":
                object.__setattr__(self, "extra", _freeze(value or {}))
                continue
            if isinstance(value, list) and _hint_has(hint, tuple):
                value = tuple(value)
            elif isinstance(value, Mapping) and not isinstance(value, FrozenMap) and _hint_has(hint, Mapping):
                value = FrozenMap({str(k): v for k, v in value.items()})
            object.__setattr__(self, f.name, value)
            if not _matches(value, hint):
                raise ValueError(
                    f"{type(self).__name__}.{f.name} must be {_type_name(hint)}, got {value!r} "
                    f"({type(value).__name__})"
                )
        self._validate()
        self.__dict__.pop("_identity_memo", None)  # computed during validation from values not final yet

    def _validate(self) -> None:
        """Checks ranges and unsupported features; overridden per method."""

    # -- errors ---------------------------------------------------------------------------------
    def _fail(self, name: str, reason: str) -> typing.NoReturn:
        raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r}: {reason}")

    def _check_range(
        self, name: str, low: float, high: float | None = None, *, high_open: bool = True
    ) -> None:
        value = getattr(self, name)
        if value is None:
            return
        too_high = high is not None and (value >= high if high_open else value > high)
        if value < low or too_high:
            bound = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
            self._fail(name, f"must be >= {low}{bound}")

    def _check_choice(self, name: str, choices: typing.Collection[str], *, lower: bool = False) -> None:
        value = getattr(self, name)
        probe = value.lower() if lower and isinstance(value, str) else value
        if probe not in choices:
            self._fail(name, f"must be one of {sorted(choices)}")

    def _check_leave_out(self) -> None:
        if any(i < 0 for i in getattr(self, "leave_out", ())):
            self._fail("leave_out", "layer indices must be >= 0")

    # -- values ---------------------------------------------------------------------------------
    def _field_items(self) -> tuple[tuple[str, Any], ...]:
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra")

    def _identity(self) -> tuple[Any, ...]:
        # computed once: the values are frozen, and spare-module keys and lookups hash configs per location
        cached = self.__dict__.get("_identity_memo")
        if cached is None:
            cached = (self.architecture, self._field_items())
            object.__setattr__(self, "_identity_memo", cached)
        return cached

    def __eq__(self, other: object) -> bool:
        # Value equality (like AdapterHub): SeqBnConfig() equals a BnConfig holding the same values.
        if not isinstance(other, _FrozenConfig):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object AdapterHub writes for this config (tuples as lists, extras appended)."""
        out: dict[str, Any] = {}
        if self._writes_architecture:
            out["architecture"] = self.architecture
        out.update((name, _to_json(value)) for name, value in self._field_items())
        out.update((k, _to_json(v)) for k, v in self.extra.items() if k not in out)
        return out

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied and validated; unknown names are a ValueError."""
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"{type(self).__name__} has no field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def _build(cls, data: Mapping[str, Any], strict: bool) -> Self:
        """Constructs ``cls`` from a dict, handling unknown keys (error, or kept in ``extra``)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        unknown = {str(k): v for k, v in data.items() if k not in names and k != "architecture"}
        if unknown:
            if strict:
                raise ValueError(f"{cls.__name__}: unknown key(s) {sorted(unknown)}")
            warnings.warn(
                f"{cls.__name__}: ignoring unknown key(s) {sorted(unknown)} (kept for writing back)",
                stacklevel=3,
            )
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in known
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"{cls.__name__}: missing required key(s) {missing}")
        return cls(**known, extra=unknown)
