"""Refuse weights that make every forward pass non-finite: NaN, infinities and absurd magnitudes.

A NaN or an infinity in any adapter tensor turns every output it touches into NaN (each later request
for the adapter would fail), and |w| of 1e30 overflows float32 in the next matmul. The scan reads each
tensor in fixed-size chunks, so memory stays bounded whatever the file's size.

MAX_ABS_WEIGHT = 1e4: adapters start near 0 (std 0.02 or zero) and trained ones stay well below 100;
with |w| <= 1e4, two chained projections over 16k-wide layers of activations below 1e2 stay under 1e19,
far from float32's and bfloat16's maximum of 3.4e38. (float16 tops out at 65504: no bound on single
weights keeps every float16 forward finite.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from server.registry.safetensors_check import TensorEntry

MAX_ABS_WEIGHT = 1e4
_CHUNK_BYTES = 4 << 20
_FLOAT_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}


def check_weight_values(path: Path, entries: dict[str, TensorEntry], max_abs: float = MAX_ABS_WEIGHT) -> None:
    """ValueError naming the first tensor of `path` holding NaN, an infinity, or a value beyond +-max_abs."""
    with path.open("rb") as f:
        for key, entry in entries.items():
            dtype = _FLOAT_DTYPES.get(entry.dtype)
            if dtype is None or entry.end == entry.start:
                continue
            f.seek(entry.start)
            step = _CHUNK_BYTES - _CHUNK_BYTES % entry.itemsize
            left = entry.end - entry.start
            while left:
                raw = bytearray(f.read(min(step, left)))
                if not raw:
                    raise ValueError(f"{path.name}: tensor {key!r} is cut short")
                left -= len(raw)
                values = torch.frombuffer(raw, dtype=dtype).to(torch.float64 if dtype == torch.float64 else torch.float32)
                if not bool(torch.isfinite(values).all()):
                    raise ValueError(f"{path.name}: tensor {key!r} holds NaN or infinite values; weights must be finite")
                peak = float(values.abs().max())
                if peak > max_abs:
                    raise ValueError(
                        f"{path.name}: tensor {key!r} holds a value of magnitude {peak:.3g}; weights must lie within "
                        f"+-{max_abs:g} (larger ones overflow the forward pass)"
                    )
