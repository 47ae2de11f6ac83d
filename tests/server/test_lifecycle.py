"""Restart durability, /metrics (promtool), full queue -> 429, readiness."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.execution.engine import Engine, Segment
from server.http.app import default_engine
from server.settings import Settings
from tests.server.conftest import SENTENCES, serve, settings_for, upload_files

pytestmark = pytest.mark.slow


def test_restart_keeps_every_adapter(tiny_model_dir: Path, keys_file: Path, tmp_path: Path, adapter_factory: Callable[[str, int], Path]) -> None:
    settings = settings_for(tiny_model_dir, tmp_path / "store", api_keys_file=keys_file)
    configs = ["seq_bn", "lora", "prefix_tuning[prefix_length=4,bottleneck_size=16]"]
    before: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    with serve(settings) as srv, srv.client("acme-key") as c:
        for i, cfg in enumerate(configs):
            assert upload_files(c, f"r{i}", adapter_factory(cfg, 80 + i)).status_code == 201
        assert upload_files(c, "r0", adapter_factory("seq_bn", 90), path="/v1/adapters/r0/versions").status_code == 201
        before = {a["name"]: (a["version"], a["sha256"], a["files"]) for a in c.get("/v1/adapters").json()["data"]}
        for name in before:
            outputs[name] = c.post("/v1/infer", json={"inputs": SENTENCES, "adapters": name}).json()["results"]
    with serve(settings) as srv, srv.client("acme-key") as c:
        after = {a["name"]: (a["version"], a["sha256"], a["files"]) for a in c.get("/v1/adapters").json()["data"]}
        assert after == before
        assert c.get("/v1/adapters/r0").json()["versions"] == [1, 2]
        for name in before:
            r = c.post("/v1/infer", json={"inputs": SENTENCES, "adapters": name})
            assert r.status_code == 200
            got = np.array([x["embedding"] for x in r.json()["results"]])
            want = np.array([x["embedding"] for x in outputs[name]])
            assert np.abs(got - want).max() < 1e-5


def test_metrics_promtool(tiny_model_dir: Path, keys_file: Path, tmp_path: Path, adapter_factory: Callable[[str, int], Path]) -> None:
    settings = settings_for(tiny_model_dir, tmp_path / "store", api_keys_file=keys_file)
    with serve(settings) as srv, srv.client("acme-key") as c:
        upload_files(c, "m1", adapter_factory("seq_bn", 3))
        c.post("/v1/infer", json={"inputs": ["fun"], "adapters": "m1"})
        c.post("/v1/infer", json={"inputs": ["fun"], "adapters": "missing"})
        c.get("/v1/adapters", headers={"Authorization": "Bearer wrong"})
        r = c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for name in (
        "adapterserve_requests_total", "adapterserve_request_seconds_bucket", "adapterserve_queue_seconds_bucket",
        "adapterserve_inference_seconds_bucket", "adapterserve_batch_size_bucket", "adapterserve_batch_distinct_adapters_bucket",
        "adapterserve_queue_depth", "adapterserve_adapters_resident", "adapterserve_adapter_cache_bytes",
        "adapterserve_adapter_loads_total", "adapterserve_adapter_load_seconds_bucket", "adapterserve_tenant_requests_total",
    ):
        assert name in text, name
    assert 'adapterserve_requests_total{route="/v1/infer",status="200"}' in text
    assert 'adapterserve_requests_total{route="/v1/infer",status="404"}' in text
    assert 'adapterserve_tenant_requests_total{tenant="acme"}' in text
    assert "m1" not in text and "missing" not in text  # never adapter names as labels
    assert 'adapter_loads_total{method="seq_bn",result="ok"} 1.0' in text
    assert 'adapterserve_adapter_load_seconds_count{method="seq_bn"} 1.0' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (apt-get install prometheus)")
        pytest.skip("promtool not installed: cannot run `promtool check metrics` (install the prometheus package)")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


class GatedEngine:
    """A real engine whose forward passes wait for a gate (to fill the queue deterministically)."""

    def __init__(self, inner: Engine, gate: threading.Event) -> None:
        self._inner = inner
        self._gate = gate
        self.entered = threading.Event()  # set once a forward pass waits at the gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def embed(self, segments: list[Segment]) -> list[np.ndarray]:
        self.entered.set()
        self._gate.wait(60)
        return self._inner.embed(segments)


def test_full_queue_answers_429(tiny_model_dir: Path, tmp_path: Path, adapter_factory: Callable[[str, int], Path]) -> None:
    gate = threading.Event()

    engines: list[GatedEngine] = []

    def factory(s: Settings) -> Engine:
        engines.append(GatedEngine(default_engine(s), gate))
        return engines[-1]  # type: ignore[return-value]

    settings = settings_for(tiny_model_dir, tmp_path / "store", queue_size=2, max_batch_size=1, max_wait_ms=0)
    with serve(settings, factory) as srv:
        with srv.client() as c:
            assert upload_files(c, "q", adapter_factory("lora", 9)).status_code == 201
        import concurrent.futures as cf

        def call() -> int:
            with srv.client() as c:
                return c.post("/v1/infer", json={"inputs": ["fun"], "adapters": "q"}).status_code

        with cf.ThreadPoolExecutor(3) as pool:
            # one running (gated) first, then two queued: sent together, all three could reach the queue
            # before the batcher takes one, and the third would get the 429
            blocked = [pool.submit(call)]
            assert engines[0].entered.wait(60), "the first request never reached the forward pass"
            blocked += [pool.submit(call) for _ in range(2)]
            try:
                with srv.client() as c:
                    deadline = time.monotonic() + 60  # a loaded CI machine can take seconds to queue them
                    while "adapterserve_queue_depth 2.0" not in c.get("/metrics").text:
                        assert time.monotonic() < deadline, "the two requests behind the gated one never queued"
                        threading.Event().wait(0.02)
                    r = c.post("/v1/infer", json={"inputs": ["fun"], "adapters": "q"})
                    assert r.status_code == 429
                    assert r.headers["retry-after"] == "1"
                    assert r.headers["content-type"].startswith("application/problem+json")
                    assert "queue is full" in r.json()["detail"]
            finally:
                gate.set()  # never leave the gated requests hanging, even when an assertion failed
            assert [f.result() for f in blocked] == [200, 200, 200]


def test_open_mode_and_readiness(tiny_model_dir: Path, tmp_path: Path, adapter_factory: Callable[[str, int], Path]) -> None:
    with serve(settings_for(tiny_model_dir, tmp_path / "store")) as srv, srv.client() as c:
        assert c.get("/readyz").status_code == 200 and c.get("/readyz").json()["status"] == "ready"
        r = upload_files(c, "open1", adapter_factory("seq_bn", 11))
        assert r.status_code == 201 and r.json()["uploader"].startswith("default:")
        assert (srv.settings.store_dir / "default" / "open1" / "1" / "meta.json").exists()
        # open mode is admin: it may manage shared adapters
        assert upload_files(c, "sh", adapter_factory("seq_bn", 11), shared="true").status_code == 201


def test_quota_and_streamed_oversize(tiny_model_dir: Path, tmp_path: Path, adapter_factory: Callable[[str, int], Path]) -> None:
    settings = settings_for(tiny_model_dir, tmp_path / "store", tenant_max_adapters=2, max_upload_mb=0.5)
    folder = adapter_factory("seq_bn", 12)
    with serve(settings) as srv, srv.client() as c:
        assert upload_files(c, "q1", folder).status_code == 201
        assert upload_files(c, "q2", folder).status_code == 201
        r = upload_files(c, "q3", folder)
        assert r.status_code == 403 and "quota" in r.json()["detail"]
        assert upload_files(c, "q1", folder).status_code == 201  # a new version of an existing adapter is fine
        assert sorted(a["name"] for a in c.get("/v1/adapters").json()["data"]) == ["q1", "q2"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
            boundary = b"--xx\r\n"
            yield boundary + b'Content-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
            yield boundary + b'Content-Disposition: form-data; name="files"; filename="adapter.safetensors"\r\n\r\n'
            for _ in range(16):
                yield b"\0" * 65536
            yield b"\r\n--xx--\r\n"

        r = c.post("/v1/adapters", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xx"})
        assert r.status_code == 413 and r.headers["content-type"].startswith("application/problem+json")
        assert c.get("/v1/adapters/big").status_code == 404


def _gated(gate: threading.Event) -> Callable[[Settings], Engine]:
    def factory(s: Settings) -> Engine:
        return GatedEngine(default_engine(s), gate)  # type: ignore[return-value]

    return factory


def _wait_metric(c: Any, line: str) -> None:
    for _ in range(500):
        if line in c.get("/metrics").text:
            return
        threading.Event().wait(0.02)
    raise AssertionError(f"metrics never showed {line!r}")


def test_delete_waits_for_queued_requests(tiny_model_dir: Path, tmp_path: Path, adapter_factory: Callable[[str, int], Path],
                                          reference: Any) -> None:
    import concurrent.futures as cf

    gate = threading.Event()
    settings = settings_for(tiny_model_dir, tmp_path / "store", max_batch_size=1, max_wait_ms=0)
    folder = adapter_factory("lora", 13)
    with serve(settings, _gated(gate)) as srv, srv.client() as c:
        assert upload_files(c, "blocker", adapter_factory("seq_bn", 14)).status_code == 201
        assert upload_files(c, "doomed", folder).status_code == 201

        def call(name: str) -> Any:
            with srv.client() as cc:
                return cc.post("/v1/infer", json={"inputs": SENTENCES[:2], "adapters": name})

        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(call, "blocker")
            _wait_metric(c, "adapterserve_requests_in_flight 1.0")
            queued = pool.submit(call, "doomed")
            _wait_metric(c, "adapterserve_queue_depth 1.0")
            r = c.delete("/v1/adapters/doomed")  # while a request that resolved it is still queued
            assert r.status_code == 200
            assert c.get("/v1/adapters/doomed").status_code == 404
            gate.set()
            assert first.result().status_code == 200
            done = queued.result()
        assert done.status_code == 200, done.text
        got = np.array([x["embedding"] for x in done.json()["results"]], dtype=np.float32)
        assert np.abs(got - reference.embed(folder, SENTENCES[:2])).max() < 1e-5
        assert c.post("/v1/infer", json={"inputs": ["fun"], "adapters": "doomed"}).status_code == 404
        _wait_metric(c, "adapterserve_adapters_resident 1.0")  # unloaded once its last request finished
        assert not list((srv.settings.store_dir / ".trash").iterdir())


def test_request_past_deadline_is_dropped(tiny_model_dir: Path, tmp_path: Path, adapter_factory: Callable[[str, int], Path]) -> None:
    import concurrent.futures as cf

    gate = threading.Event()
    settings = settings_for(tiny_model_dir, tmp_path / "store", max_batch_size=1, max_wait_ms=0, request_timeout_s=1.0)
    with serve(settings, _gated(gate)) as srv, srv.client() as c:
        assert upload_files(c, "d", adapter_factory("seq_bn", 15)).status_code == 201

        def call() -> Any:
            with srv.client() as cc:
                return cc.post("/v1/infer", json={"inputs": ["fun"], "adapters": "d"})

        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(call)
            _wait_metric(c, "adapterserve_requests_in_flight 1.0")
            late = pool.submit(call)
            _wait_metric(c, "adapterserve_queue_depth 1.0")
            threading.Event().wait(1.2)  # let the queued request's deadline pass while the first one is held
            gate.set()
            assert first.result().status_code == 200
            r = late.result()
        assert r.status_code == 504
        assert r.headers["content-type"].startswith("application/problem+json") and "deadline" in r.json()["detail"]
