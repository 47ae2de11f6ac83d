"""The model in a child process, so forward passes never wait for the event loop's GIL.

In one process the inference thread gives the GIL up at every torch op and must win it back from the
event loop (HTTP, JSON, tokenization): under load that cost it 8-9% of its time off-CPU, in GIL waits
(bench/serve_cpu.py). `WorkerEngine` keeps HTTP, tokenization and upload validation in the server
process and sends each load, unload and batch to a child process that owns the model and runs
`Engine` there, over a private pipe. The child is started with "spawn" (safe with CUDA), ignores
SIGINT/SIGTERM (the parent drains and then closes the pipe), and exits when the pipe closes. If it
dies, the call in flight fails and the next call starts a new child and loads the same adapters again.

The pipe carries pickles only between this process and the child it started; nothing a client sent is
ever unpickled (clients' texts arrive as token ids in lists).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import signal
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.engine import Backbone, Classified, Engine, Segment

log = logging.getLogger("adapterserve.worker")

START_TIMEOUT_S = 600.0  # loading a large backbone onto a GPU can take minutes


class WorkerDied(RuntimeError):
    """The inference child process exited; the next call starts a new one."""


class WorkerEngine(Backbone):
    """Same interface as `Engine`; the model lives in a child process."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "float32", threads: int = 0) -> None:
        from transformers import AutoConfig

        from adapters_core import AutoAdapterModel

        super().__init__(model_path)
        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            self._describe(AutoAdapterModel.from_config(config))
        self._args = (model_path, device, dtype, threads)
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._loaded: dict[str, Path] = {}  # internal name -> folder: what a new child loads again
        self._proc: Any = None
        self._conn: Connection | None = None
        self.restarts = 0
        self.on_restart: Callable[[], None] | None = None
        self.device = ""
        self._start()
        # Before multiprocessing's own exit hook joins its children: the child ignores SIGTERM and would only
        # leave once the pipe closes (atexit runs hooks last-registered first).
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- the child's lifecycle -------------------------------------------------------------------
    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, args=(child, *self._args), name="adapterserve-inference", daemon=True)
        proc.start()
        child.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not parent.poll(0.2):
            if not proc.is_alive() or time.monotonic() > deadline:
                proc.kill()
                parent.close()
                raise RuntimeError(f"the inference worker process did not start (exit code {proc.exitcode})")
        status, payload = parent.recv()
        if status != "ok":
            proc.join(10)
            parent.close()
            raise _error(payload)
        self._proc, self._conn = proc, parent
        self.device = str(payload["device"])
        log.info("inference worker pid %d: %s on %s", proc.pid, self.name, self.device)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

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
        for internal, path in list(self._loaded.items()):
            try:
                self._request("load", path, internal)
            except Exception:
                log.exception("reloading adapter %s into the new inference worker failed", internal)
                self._loaded.pop(internal, None)

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
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
            self._proc.join(5)
            code = self._proc.exitcode
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

    def load(self, path: Path, internal: str) -> int:
        nbytes = int(self._call("load", Path(path), internal))
        self._loaded[internal] = Path(path)
        return nbytes

    def unload(self, internal: str) -> None:
        self._loaded.pop(internal, None)
        self._call("unload", internal)

    def embed(self, segments: list[Segment]) -> list[np.ndarray]:
        return list(self._call("embed", segments))

    def classify(self, segments: list[Segment], labels: dict[str, dict[int, str]]) -> list[list[Classified]]:
        return list(self._call("classify", segments, labels))


AnyEngine = Engine | WorkerEngine


def _close_at_exit(ref: weakref.ref[WorkerEngine]) -> None:
    engine = ref()
    if engine is not None:
        engine.close()


def _error(payload: tuple[str, str]) -> Exception:
    """The child's exception as the parent raises it: ValueError stays ValueError (the caller's fault)."""
    kind, message = payload
    return ValueError(message) if kind == "ValueError" else RuntimeError(f"{kind}: {message}")


_OPS: dict[str, Callable[..., Any]] = {
    "load": Engine.load,
    "unload": Engine.unload,
    "embed": Engine.embed,
    "classify": Engine.classify,
}


def worker_main(conn: Connection, model_path: str, device: str, dtype: str, threads: int) -> None:
    """The child: build the Engine, then answer requests until the pipe closes or "stop" arrives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = Engine(model_path, device, dtype, threads)
    except Exception as exc:
        conn.send(("error", (type(exc).__name__, str(exc))))
        return
    conn.send(("ok", {"device": str(engine.device)}))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        if op == "stop":
            return
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
