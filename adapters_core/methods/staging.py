"""Copying an adapter's file tensors into its parameters, through pinned memory when they live on a GPU.

A plain `param.copy_(cpu_tensor)` to CUDA is a synchronous, pageable transfer per tensor. Here every
tensor of one adapter is packed into one reusable pinned host buffer and sent with non-blocking copies on
the current stream; the host waits only before it overwrites that buffer for the next adapter (an event),
so the transfer overlaps whatever the host does next, and the model's next forward on the same stream is
ordered after it. CPU parameters are copied directly.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

__all__ = ["copy_into"]

_ALIGN = 64  # bytes: every packed tensor starts aligned for any dtype


class _Staging:
    """One pinned buffer per device type index, reused across loads (grown when an adapter needs more)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffer: torch.Tensor | None = None
        self.done: torch.cuda.Event | None = None


_STAGING: dict[torch.device, _Staging] = {}
_STAGING_LOCK = threading.Lock()


def _staging(device: torch.device) -> _Staging:
    with _STAGING_LOCK:
        return _STAGING.setdefault(device, _Staging())


def copy_into(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """`dst.copy_(src)` for every (dst, src); CUDA destinations in one pinned, non-blocking batch."""
    with torch.no_grad():
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for dst, src in pairs:
            if dst.device.type == "cuda" and src.device.type == "cpu":
                by_device.setdefault(dst.device, []).append((dst, src))
            else:
                dst.copy_(src)
        for device, group in by_device.items():
            _copy_pinned(device, group)


def _copy_pinned(device: torch.device, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    sizes = [dst.numel() * dst.element_size() for dst, _ in pairs]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    stage = _staging(device)
    with stage.lock:
        if stage.done is not None:
            stage.done.synchronize()  # the previous adapter's transfer has left the buffer
        if stage.buffer is None or stage.buffer.numel() < total:
            stage.buffer = torch.empty(max(total, 1 << 20), dtype=torch.uint8, pin_memory=True)
        for (dst, src), offset, n in zip(pairs, offsets, sizes, strict=True):
            host = stage.buffer[offset:offset + n].view(dst.dtype).view(dst.shape)
            host.copy_(src)  # converts the dtype on the host, as a plain copy_ would
            dst.copy_(host, non_blocking=True)
        stage.done = torch.cuda.Event()
        stage.done.record(torch.cuda.current_stream(device))
