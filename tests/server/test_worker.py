"""The inference worker process (server.execution.worker): same answers as the in-process engine, the model really lives in
the child, a dead child is replaced with every adapter loaded again, and the child never imports a web framework."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from server.execution.engine import Engine
from server.execution.worker import WorkerEngine
from server.http.app import default_engine
from tests.server.conftest import SENTENCES, Reference, serve, settings_for, upload_files

CONFIGS = ("seq_bn", "lora", "prefix_tuning[prefix_length=4,bottleneck_size=16]")


def _emb(body: dict) -> np.ndarray:
    return np.array([r["embedding"] for r in body["results"]], dtype=np.float32)


@pytest.mark.parametrize("worker", [True, False], ids=["worker-process", "in-process"])
def test_mixed_concurrent_requests_equal_library(worker: bool, tiny_model_dir: Path, tmp_path: Path,
                                                 adapter_factory: Callable[[str, int], Path], reference: Reference) -> None:
    folders = {f"w{i}": adapter_factory(CONFIGS[i % 3], 300 + i) for i in range(9)}
    settings = settings_for(tiny_model_dir, tmp_path / "store", inference_worker=worker, max_wait_ms=50)
    with serve(settings) as srv:
        engine = srv.app.state.runtime.engine
        assert isinstance(engine, WorkerEngine) is worker and isinstance(engine, Engine) is not worker
        with srv.client() as c:
            for name, folder in folders.items():
                assert upload_files(c, name, folder).status_code == 201

        def call(name: str) -> np.ndarray:
            with srv.client() as c:
                r = c.post("/v1/infer", json={"inputs": SENTENCES[:2], "adapters": name})
                assert r.status_code == 200, r.text
                return _emb(r.json())

        with cf.ThreadPoolExecutor(9) as pool:
            got = dict(zip(folders, pool.map(call, folders), strict=True))
    for name, folder in folders.items():
        assert np.abs(got[name] - reference.embed(folder, SENTENCES[:2])).max() < 1e-5, name


def test_model_lives_in_the_child(tiny_model_dir: Path, adapter_factory: Callable[[str, int], Path]) -> None:
    engine = WorkerEngine(str(tiny_model_dir), device="cpu")
    try:
        assert engine.alive and engine.pid is not None and engine.pid != os.getpid()
        # this process keeps only a meta-device skeleton (shapes for upload validation), no weights
        params = list(engine._shape_model.parameters())
        assert params and all(p.device.type == "meta" for p in params)
        info = engine.inspect(adapter_factory("lora", 310))
        assert info.method == "lora" and info.nbytes > 0
        # a library error in the child comes back as the same kind (the server maps ValueError to 4xx)
        with pytest.raises(ValueError, match="nope"):
            engine.unload("nope")
    finally:
        engine.close()
    assert not engine.alive


def test_the_child_takes_the_switch_interval(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The child's GIL switch interval is the setting's (its read-ahead thread shares the GIL with the forward pass),
    and Python's own 5 ms when the setting is 0."""
    engines = [default_engine(settings_for(tiny_model_dir, tmp_path / "store", inference_worker=True)),
               WorkerEngine(str(tiny_model_dir), device="cpu", switch_interval_ms=0)]
    try:
        assert [e.child_switch_interval_s for e in engines] == [pytest.approx(0.0001), pytest.approx(0.005)]
    finally:
        for engine in engines:
            engine.close()


def test_dead_worker_is_replaced_with_its_adapters(tiny_model_dir: Path, tmp_path: Path,
                                                   adapter_factory: Callable[[str, int], Path], reference: Reference) -> None:
    folders = {"k0": adapter_factory("seq_bn", 320), "k1": adapter_factory("prefix_tuning[prefix_length=4,bottleneck_size=16]", 321)}
    with serve(settings_for(tiny_model_dir, tmp_path / "store", inference_worker=True)) as srv, srv.client() as c:
        for name, folder in folders.items():
            assert upload_files(c, name, folder).status_code == 201
            assert c.post("/v1/infer", json={"inputs": ["fun"], "adapters": name}).status_code == 200  # now resident
        engine: WorkerEngine = srv.app.state.runtime.engine
        old = engine.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while engine.alive:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for name, folder in folders.items():  # residency still counts them loaded: the new child must have them
            r = c.post("/v1/infer", json={"inputs": SENTENCES[:2], "adapters": name})
            assert r.status_code == 200, r.text
            assert np.abs(_emb(r.json()) - reference.embed(folder, SENTENCES[:2])).max() < 1e-5
        assert engine.pid not in (None, old)
        assert "adapterserve_inference_worker_restarts_total 1.0" in c.get("/metrics").text


def test_process_exits_without_close(tiny_model_dir: Path) -> None:
    """A process that exits without closing its engine exits at once, and its worker (which ignores SIGTERM)
    follows when the socket closes; the script has no __main__ guard, which multiprocessing's spawn needed."""
    code = (
        "import sys; from server.execution.worker import WorkerEngine; "
        f"e = WorkerEngine({str(tiny_model_dir)!r}, device='cpu'); print(e.pid, flush=True)"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    child = int(proc.stdout.strip())
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and "zombie" not in _state(child):
        assert time.monotonic() < deadline, "the worker outlived its parent"
        time.sleep(0.05)


def test_worker_child_imports_no_web_framework(tiny_model_dir: Path, adapter_factory: Callable[[str, int], Path]) -> None:
    """What the child runs (its module, the Engine it builds, a load and a forward pass, with their lazy imports)
    in a fresh interpreter leaves fastapi and starlette out of sys.modules."""
    code = (
        "import sys\n"
        "import server.execution.worker as worker\n"
        f"engine = worker.Engine({str(tiny_model_dir)!r}, device='cpu')\n"
        f"engine.load({str(adapter_factory('seq_bn', 340))!r}, 'a')\n"
        "engine.embed([worker.Segment('a', [[2, 7, 3]])])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette')))\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_adapter_the_new_worker_cannot_load_is_forgotten(tiny_model_dir: Path, tmp_path: Path,
                                                         adapter_factory: Callable[[str, int], Path], reference: Reference) -> None:
    """A restarted worker reloads what the old one had; one that fails to load (its stored file broke) leaves
    residency too, so later requests for it answer 503 (cannot be loaded) instead of reaching the model."""
    good, bad = adapter_factory("lora", 330), adapter_factory("seq_bn", 331)
    settings = settings_for(tiny_model_dir, tmp_path / "store", inference_worker=True)
    with serve(settings) as srv, srv.client() as c:
        for name, folder in (("good", good), ("bad", bad)):
            assert upload_files(c, name, folder).status_code == 201
            assert c.post("/v1/infer", json={"inputs": ["fun"], "adapters": name}).status_code == 200
        stored = settings.store_dir / "default" / "bad" / "1" / "adapter.safetensors"
        stored.write_bytes(b"\0" * 64)  # broken on the volume after it was loaded
        engine: WorkerEngine = srv.app.state.runtime.engine
        assert engine.pid is not None
        os.kill(engine.pid, signal.SIGKILL)
        while engine.alive:
            time.sleep(0.02)
        r = c.post("/v1/infer", json={"inputs": SENTENCES[:2], "adapters": "good"})  # restarts the worker
        assert r.status_code == 200, r.text
        assert np.abs(_emb(r.json()) - reference.embed(good, SENTENCES[:2])).max() < 1e-5
        assert not srv.app.state.runtime.residency.is_resident(
            srv.app.state.runtime.store.latest("default", "bad").internal)
        r = c.post("/v1/infer", json={"inputs": ["fun"], "adapters": "bad"})
        assert r.status_code == 503 and "cannot be loaded" in r.json()["detail"], r.text
