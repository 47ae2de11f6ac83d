"""Structural checks of a .safetensors file without loading it (header, dtypes, offsets, sizes)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from server.registry.jsonsafe import load_json

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its dtype, shape and byte span [start, end) in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def itemsize(self) -> int:
        return _DTYPE_BYTES[self.dtype]


def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Validate the file's structure and return {key: shape}; ValueError says what is wrong."""
    return {key: entry.shape for key, entry in read_safetensors_header(path).items()}


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Validate the file's structure and return {key: entry}; ValueError says what is wrong."""
    name = path.name
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{name}: not a safetensors file (shorter than its 8-byte header length)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > MAX_HEADER or 8 + hlen > size:
            raise ValueError(f"{name}: not a safetensors file (header length {hlen} does not fit the file)")
        try:
            header = load_json(f.read(hlen), "header")
        except ValueError as exc:
            raise ValueError(f"{name}: safetensors {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name}: safetensors header is not an object")
    data_size = size - 8 - hlen
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ValueError(f"{name}: entry {key!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"{name}: tensor {key!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{name}: tensor {key!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise ValueError(f"{name}: tensor {key!r} has data offsets {offsets!r} outside the file")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * _DTYPE_BYTES[dtype]:
            raise ValueError(f"{name}: tensor {key!r} byte length does not match shape {shape} and dtype {dtype}")
        entries[key] = TensorEntry(dtype, tuple(shape), 8 + hlen + offsets[0], 8 + hlen + offsets[1])
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise ValueError(f"{name}: tensors {a!r} and {b!r} overlap")
    if not entries:
        raise ValueError(f"{name}: holds no tensors")
    return entries
