"""JSON from an upload, parsed without recursion blow-ups and without non-finite numbers.

Python's json recurses once per nesting level (100k `[` is a RecursionError, a 500) and accepts NaN,
Infinity and 1e999. Nesting is measured on the raw bytes first (escapes dropped, then running counts of
quotes and brackets over fixed-size chunks), so the cost is linear in the file's size and the parser never sees
deep input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

MAX_DEPTH = 64
MAX_CONFIG_NUMBER = 1e6
_SCAN_CHUNK = 1 << 20


def nesting_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects outside strings (an over-estimate for invalid JSON).
    Escape pairs are dropped first, so every quote left opens or closes a string; a bracket counts when an
    even number of quotes precede it."""
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    depth = peak = quotes = 0
    for start in range(0, len(text), _SCAN_CHUNK):
        chunk = np.frombuffer(text, np.uint8, count=min(_SCAN_CHUNK, len(text) - start), offset=start)
        is_quote = chunk == 0x22
        outside = (np.cumsum(is_quote, dtype=np.int64) + quotes) % 2 == 0
        quotes += int(is_quote.sum())
        opens = ((chunk == 0x5B) | (chunk == 0x7B)) & outside
        closes = ((chunk == 0x5D) | (chunk == 0x7D)) & outside
        running = np.cumsum(opens.astype(np.int64) - closes.astype(np.int64)) + depth
        peak = max(peak, int(running.max()))
        depth = int(running[-1])
    return peak


def _numbers(value: Any, path: str) -> Iterator[tuple[str, float | int]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path or "(top level)", value


def load_json(raw: bytes, name: str, max_abs: float | None = None) -> Any:
    """Parse `raw`; ValueError naming `name` for invalid JSON, nesting over MAX_DEPTH, a non-finite number,
    or (when `max_abs` is given) a number outside +-max_abs, with the path of the offending value."""
    depth = nesting_depth(raw)
    if depth > MAX_DEPTH:
        raise ValueError(f"{name} nests arrays/objects {depth} levels deep; at most {MAX_DEPTH} are accepted")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not UTF-8 text: {exc}") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ValueError(f"{name} is not JSON ({exc})") from None
    for path, number in _numbers(data, ""):
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"{name}: {path} is {number}; numbers must be finite (NaN and Infinity are refused)")
        if max_abs is not None and abs(number) > max_abs:
            raise ValueError(f"{name}: {path} is {number:.6g}; numbers in a config must lie within +-{max_abs:g}")
    return data
