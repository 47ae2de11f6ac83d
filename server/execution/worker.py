"""The model in a child process, so forward passes never wait for the event loop's GIL.

In one process the inference thread gives the GIL up at every torch op and must win it back from the
event loop (HTTP, JSON, tokenization): under bench/serve_load.py's load that left it off-CPU 8-9% of
the time, in GIL waits (its /proc counters: ~700 voluntary context switches a second). `WorkerEngine`
keeps HTTP, tokenization and upload validation in the server process and sends each load, unload and
batch to a child process that owns the model and runs `Engine` there, over a private socket pair. The
child is a fresh interpreter (`python -m server.execution.worker`, safe with CUDA, and unlike multiprocessing's
"spawn" it never re-imports the parent's `__main__`), ignores SIGINT/SIGTERM (the parent drains and
then closes the socket), and exits when the socket closes. If it dies, the call in flight fails and the
next call starts a new child and loads the same adapters again. Unloads and read-ahead hints are sent without
waiting for an answer (the socket keeps their order with the other calls), so an eviction or a hint costs the
inference thread no round trip.

The socket carries pickles only between this process and the child it started; nothing a client sent is
ever unpickled (clients' texts arrive as token ids in lists).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.execution.engine import Backbone, Classified, Engine, Segment
from server.execution.generator import Limits, SeqSpec, StepResult
from server.execution.residency import Loaded

log = logging.getLogger("adapterserve.worker")

START_TIMEOUT_S = 600.0  # loading a large backbone onto a GPU can take minutes
SETTLE_EVERY_LOADS = 32  # adapter loads between two settle_heap() calls (each walks only what came since the last)


class WorkerDied(RuntimeError):
    """The inference child process exited; the next call starts a new one."""


class WorkerEngine(Backbone):
    """Same interface as `Engine`; the model lives in a child process."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "float32", threads: int = 0,
                 length_buckets: int = 1, stack_cache_bytes: int = 64 << 20, lanes: int = 1,
                 switch_interval_ms: float = 0) -> None:
        """`switch_interval_ms` > 0: the child's GIL switch interval, so its read-ahead thread holds the GIL for no
        longer than that while the forward pass waits to dispatch its next op (0: Python's 5 ms)."""
        from transformers import AutoConfig

        from adapters_core import AutoAdapterModel

        super().__init__(model_path)
        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            self._describe(AutoAdapterModel.from_config(config))
        self._args = (model_path, device, dtype, threads, length_buckets, stack_cache_bytes, lanes)
        self._switch_interval_s = switch_interval_ms / 1000.0
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[Path, tuple[str, ...]]] = {}  # internal -> (folder, fused): what a new child reloads
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self.restarts = 0
        self.on_restart: Callable[[], None] | None = None
        self.on_lost: Callable[[str], None] | None = None  # an adapter the new child could not load again
        self.device = ""
        self.child_switch_interval_s = 0.0
        self.lanes = 1
        self._start()

    # -- the child's lifecycle -------------------------------------------------------------------
    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)  # the child imports what this process can (bench scripts extend sys.path)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        proc = subprocess.Popen([sys.executable, "-m", "server.execution.worker", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        conn = Connection(ours.detach())
        try:
            conn.send((self._args, self._switch_interval_s))
            deadline = time.monotonic() + START_TIMEOUT_S
            while not conn.poll(0.2):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise EOFError
            status, payload = conn.recv()
        except (EOFError, OSError):
            conn.close()
            proc.kill()
            raise RuntimeError(f"the inference worker process did not start (exit code {proc.wait(10)})") from None
        if status != "ok":
            conn.close()
            proc.wait(10)
            raise _error(payload)
        self._proc, self._conn = proc, conn
        self.device = str(payload["device"])
        self.child_switch_interval_s = float(payload["switch_interval_s"])  # as the child reports it
        self.lanes = int(payload["lanes"])
        log.info("inference worker pid %d: %s on %s", proc.pid, self.name, self.device)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else int(self._proc.pid)

    def _restart(self) -> None:
        """A new child with every adapter the old one had (residency's view stays true)."""
        self._discard()
        self._start()
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart()
        for internal, (path, fuses) in list(self._loaded.items()):  # in load order: adapters before their fusions
            try:
                self._request("load", path, internal, fuses)
            except Exception:
                log.exception("reloading adapter %s into the new inference worker failed", internal)
                self._loaded.pop(internal, None)
                if self.on_lost is not None:
                    self.on_lost(internal)

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc, self._conn = None, None

    def close(self) -> None:
        """Ask the child to exit and wait for it (it also exits on its own when this process dies)."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send(("stop", ()))
                except OSError:
                    pass
            self._discard()

    # -- calls -----------------------------------------------------------------------------------
    def _request(self, op: str, *args: Any) -> Any:
        assert self._conn is not None and self._proc is not None
        try:
            self._conn.send((op, args))
            status, payload = self._conn.recv()
        except (EOFError, OSError):
            try:
                code: int | None = self._proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            self._discard()
            raise WorkerDied(f"the inference worker process died (exit code {code}); a new one starts with the next request") from None
        if status != "ok":
            raise _error(payload)
        return payload

    def _call(self, op: str, *args: Any) -> Any:
        with self._lock:
            if not self.alive:
                log.warning("inference worker is gone; starting a new one")
                self._restart()
            return self._request(op, *args)

    def load(self, path: Path, internal: str, fuses: Sequence[str] = ()) -> Loaded:
        loaded: Loaded = self._call("load", Path(path), internal, tuple(fuses))
        self._loaded[internal] = (Path(path), tuple(fuses))
        return loaded

    def read_ahead(self, folders: Sequence[Path]) -> None:
        """As Engine.read_ahead; one message the child does not answer, so the caller never waits for it."""
        if folders:
            self._send_one_way("read_ahead", list(folders))

    def _send_one_way(self, op: str, *args: Any) -> None:
        """An op in `_ONE_WAY`: sent in order with the others, never answered (the child logs its failures)."""
        with self._lock:
            if self._conn is None or not self.alive:
                return
            try:
                self._conn.send((op, args))
            except OSError:
                pass  # the next call finds the child gone and starts a new one

    def unload(self, internal: str) -> None:
        """As Engine.unload: the child drops the fusions over an unloaded adapter, and so does the replay list.

        The name is checked here (ValueError when this child was never given it) and the child is not waited
        for: an eviction costs the inference thread no round trip (an empty call took 0.36-0.75 ms on a 2-core
        node), and the socket keeps the order, so the next load or batch finds the adapter gone. A child that is
        not running has nothing to unload: the next call starts one without it.
        """
        if internal not in self._loaded:
            raise ValueError(f"no adapter named {internal!r}")
        del self._loaded[internal]
        for fusion in [f for f, (_, fuses) in self._loaded.items() if internal in fuses]:
            del self._loaded[fusion]
        self._send_one_way("unload", internal)

    def embed(self, segments: list[Segment]) -> list[np.ndarray]:
        return list(self._call("embed", segments))

    def classify(self, segments: list[Segment], labels: dict[str, dict[int, str]]) -> list[list[Classified]]:
        return list(self._call("classify", segments, labels))


    def generation_step(self, admit: list[SeqSpec], cancel: list[int], limits: Limits) -> StepResult:
        """One generation step in the child; a child started anew holds no sequences (the caller failed them)."""
        return self._call("generation_step", admit, cancel, limits)  # type: ignore[no-any-return]

    def generation_reset(self) -> None:
        if self.alive:
            self._call("generation_reset")


AnyEngine = Engine | WorkerEngine


def _error(payload: tuple[str, str]) -> Exception:
    """The child's exception as the parent raises it: ValueError stays ValueError (the caller's fault)."""
    kind, message = payload
    return ValueError(message) if kind == "ValueError" else RuntimeError(f"{kind}: {message}")


_OPS: dict[str, Callable[..., Any]] = {
    "load": Engine.load,
    "embed": Engine.embed,
    "classify": Engine.classify,
    "generation_step": Engine.generation_step,
    "generation_reset": Engine.generation_reset,
}
_ONE_WAY: dict[str, Callable[..., None]] = {"read_ahead": Engine.read_ahead, "unload": Engine.unload}  # never answered


def worker_main(conn: Connection) -> None:
    """The child: build the Engine, then answer requests until the socket closes or "stop" arrives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        args, switch_interval_s = conn.recv()
    except (EOFError, OSError):
        return
    if switch_interval_s > 0:
        sys.setswitchinterval(switch_interval_s)
    try:
        engine = Engine(*args)
    except Exception as exc:
        conn.send(("error", (type(exc).__name__, str(exc))))
        return
    settle_heap()
    conn.send(("ok", {"device": str(engine.device), "switch_interval_s": sys.getswitchinterval(), "lanes": engine.lanes}))
    loads = 0
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        if op == "stop":
            return
        if op in _ONE_WAY:
            try:
                _ONE_WAY[op](engine, *args)
            except Exception:
                log.exception("%s failed in the inference worker", op)
            continue
        try:
            result = _OPS[op](engine, *args)
        except Exception as exc:
            reply: tuple[str, Any] = ("error", (type(exc).__name__, str(exc)))
        else:
            reply = ("ok", result)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        if op == "load":
            loads += 1
            if loads % SETTLE_EVERY_LOADS == 0:
                settle_heap()


def settle_heap() -> None:
    """Collect, then move every live object out of the collector's reach (gc.freeze).

    The backbone, torch and transformers are most of this process's heap and live as long as it does, and a full
    collection walks everything tracked: on MiniLM each took ~300 ms, three times in the middle of loads while 1000
    adapters were loaded, then up to 120 ms as the adapters' own modules piled up. Frozen objects are still freed
    by reference counting when they are dropped (an adapter's modules hold no reference cycles), so nothing leaks;
    collecting first keeps cyclic garbage from being frozen.
    """
    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    worker_main(Connection(int(sys.argv[1])))
