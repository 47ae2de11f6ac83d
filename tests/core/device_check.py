"""The CUDA path checked on a CPU-only machine: index tensors on their weights' device, no syncs in layers.

`device_check()` runs two torch modes, so the suite's mixed-batch tests catch what only a GPU would show:

- the host is played by the `meta` device: a tensor the library builds from host data (`torch.tensor` or
  `torch.as_tensor` called from `adapters_core.methods`, or from any library code during a forward) lands
  on `meta`, as it would sit on the host beside CUDA weights. The routing plan's own copies are built in `adapters_core.routing` and placed on the weights'
  device by `routing.place`, the one host->device copy, so they stay on the CPU;
- every aten op whose tensor arguments live on more than one device (0-dim CPU scalars aside, which CUDA
  kernels accept too) fails, naming the op and the library line that issued it; so does a host sync
  (`.item()`, `bool(t)`, `int(t)`, `torch.equal`, `Tensor.tolist`) issued by `adapters_core.methods`
  while a forward pass runs.

flex_attention cannot run under it (torch.compile refuses a Python dispatch mode).

`DeviceCheck.created` counts the host->device tensors of each forward (the routing plan's placements plus
host-data tensors built by the library): a forward's count must not grow with the number of layers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from adapters_core import routing
from adapters_core.routing import ForwardContext

HOST = torch.device("meta")
_BUILDERS = (torch.tensor, torch.as_tensor)
_SYNCS = frozenset({
    torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default,
})
_TRANSFERS = frozenset({torch.ops.aten.copy_.default})  # dst.copy_(src) copies across devices on CUDA too
_OWN = (__name__, "torch.", "torch")


class DeviceCheckError(AssertionError):
    """A tensor op that would mix devices, or a host sync inside a layer, on a real accelerator."""


def _library_frame() -> FrameType | None:
    """The innermost frame of adapters_core code on the stack (torch's and this module's frames skipped)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("adapters_core"):
            return frame
        if not name.startswith(_OWN) and name != "contextlib":
            return None
        frame = frame.f_back
    return None


def _call_site() -> str:
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("adapters_core"):
            return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "outside adapters_core"


def _in_layers() -> bool:
    frame = _library_frame()
    return (frame is not None and frame.f_globals["__name__"].startswith("adapters_core.methods")
            and ForwardContext.current() is not None)


@dataclass
class DeviceCheck:
    """What the modes saw: host->device tensors built in each forward (its ForwardContext kept alive here)."""

    created: list[tuple[ForwardContext, int]] = field(default_factory=list)

    def count(self) -> None:
        ctx = ForwardContext.current()
        if ctx is None:
            return
        for i, (seen, n) in enumerate(self.created):
            if seen is ctx:
                self.created[i] = (seen, n + 1)
                return
        self.created.append((ctx, 1))

    def per_forward(self) -> list[int]:
        return [n for _, n in self.created]


def _builds_for_kernels(module: str) -> bool:
    """Host data turned into a tensor here feeds kernels: the methods' code, or any library code in a forward
    (loading copies files into parameters with copy_, a real host->device copy)."""
    if module == routing.__name__:
        return False
    return module.startswith("adapters_core.methods") or ForwardContext.current() is not None


class _HostAsMeta(TorchFunctionMode):
    def __init__(self, check: DeviceCheck, redirect: bool) -> None:
        super().__init__()
        self.check, self.redirect = check, redirect

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        frame = _library_frame() if func in _BUILDERS else None
        if frame is not None and _builds_for_kernels(frame.f_globals["__name__"]):
            self.check.count()
            if self.redirect:
                kwargs["device"] = HOST
        elif self.redirect and func is torch.Tensor.tolist and _in_layers():
            raise DeviceCheckError(f"host sync: Tensor.tolist at {_call_site()}")
        return func(*args, **kwargs)


class _SameDevice(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.dim() == 0 and t.device.type == "cpu")}
        if len(devices) > 1 and func not in _TRANSFERS:
            names = ", ".join(sorted(str(d) for d in devices))
            raise DeviceCheckError(f"{func} mixes devices ({names}) at {_call_site()}")
        if func in _SYNCS and _in_layers():
            raise DeviceCheckError(f"host sync: {func} at {_call_site()}")
        return func(*args, **kwargs)


@contextmanager
def device_check(count_only: bool = False) -> Iterator[DeviceCheck]:
    """Run the code inside with the host played by `meta` and every op checked (see the module docstring);
    `count_only` only counts the host->device tensors of each forward."""
    check = DeviceCheck()
    place = getattr(routing, "place", None)

    def counted(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        check.count()
        return place(t, device)

    with ExitStack() as stack:
        if place is not None:
            stack.enter_context(mock.patch.object(routing, "place", counted))
        stack.enter_context(_HostAsMeta(check, redirect=not count_only))
        if not count_only:
            stack.enter_context(_SameDevice())
        yield check
