"""The generation scheduler through a real server: joining at the next step, cancellation, the KV budget, a full
queue, hot swap and delete during a stream, a killed inference worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import Running, serve, settings_for, upload_files
from tests.server.gen_support import SoloReference

PROMPT = "the movie was"


@pytest.fixture(scope="module")
def llama(lm_dirs: dict[str, Path]) -> Path:
    return lm_dirs["llama"]


@pytest.fixture(scope="module")
def solo(llama: Path) -> SoloReference:
    return SoloReference(llama)


def _settings(llama: Path, tmp: Path, **kw: Any) -> Any:
    return settings_for(llama, tmp, torch_threads=1, **kw)


def metric(c: httpx.Client, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def complete_all_at_once(c: httpx.Client, model: str, prompts: list[str], max_tokens: int) -> list[str | None]:
    """Greedy completions of every prompt, all sent at once (one thread each); each must answer 200."""
    results: list[str | None] = [None] * len(prompts)

    def run(i: int) -> None:
        r = c.post("/v1/completions", json={"model": model, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0})
        assert r.status_code == 200, r.text
        results[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


class Stream:
    """A streaming completion read on a thread: its chunks' texts, its error events, whether [DONE] came."""

    def __init__(self, srv: Running, body: dict[str, Any], path: str = "/v1/completions") -> None:
        self.texts: list[str] = []
        self.errors: list[dict[str, Any]] = []
        self.done = threading.Event()
        self.first = threading.Event()
        self.stop = threading.Event()
        self.status = 0
        self._thread = threading.Thread(target=self._run, args=(srv, path, body), daemon=True)
        self._thread.start()

    def _run(self, srv: Running, path: str, body: dict[str, Any]) -> None:
        with srv.client() as c, c.stream("POST", path, json={**body, "stream": True}) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if self.stop.is_set():
                    return  # leaving the block closes the connection: the client went away
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.done.set()
                    return
                ev = json.loads(line[6:])
                if "error" in ev:
                    self.errors.append(ev["error"])
                    continue
                self.texts.append("".join(ch.get("text") or "" for ch in ev["choices"]))
                self.first.set()
        self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def join(self, timeout: float = 60) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive()


def long_body(model: str, tokens: int = 200) -> dict[str, Any]:
    return {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def srv(llama: Path, tmp_path_factory: pytest.TempPathFactory, lm_adapters: dict[tuple[str, str], Path]) -> Iterator[Running]:
    with serve(_settings(llama, tmp_path_factory.mktemp("sched"))) as running:
        with running.client() as c:
            assert upload_files(c, "lora", lm_adapters[("llama", "lora")]).status_code == 201
        yield running


def test_a_short_request_joins_a_long_generation_and_finishes_first(srv: Running) -> None:
    long = Stream(srv, long_body("lora", 230))
    assert long.first.wait(30)
    with srv.client() as c:
        r = c.post("/v1/completions", json={"model": "lora", "prompt": "a very boring", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200
        assert not long.done.is_set()  # the long one is still running: the short one joined it and left
    long.join()
    assert len(long.texts) > 1 and long.done.is_set()


def test_a_disconnected_stream_leaves_the_running_set_and_frees_its_cache(srv: Running) -> None:
    check_a_disconnected_stream_frees_its_cache(srv, "lora")


def check_a_disconnected_stream_frees_its_cache(srv: Running, model: str) -> None:
    """A stream of 230 tokens whose client leaves after the first chunk: it leaves the running set, the cache is freed."""
    gen = srv.app.state.runtime.generation
    steps = gen.steps
    long = Stream(srv, long_body(model, 230))
    assert long.first.wait(30)
    with srv.client() as c:
        assert metric(c, "adapterserve_generation_running_sequences") == 1
        assert metric(c, "adapterserve_kv_cache_bytes") > 0
        assert 0 < metric(c, "adapterserve_kv_cache_used_bytes") <= metric(c, "adapterserve_kv_cache_bytes")
        long.stop.set()
        long.join()
        wait_for(lambda: metric(c, "adapterserve_generation_running_sequences") == 0)
        assert metric(c, "adapterserve_kv_cache_bytes") == 0 and metric(c, "adapterserve_kv_cache_used_bytes") == 0
    assert gen.steps - steps < 200  # it stopped long before its 230 tokens
    assert not long.done.is_set()


def test_more_requests_than_the_kv_budget_holds_wait_and_all_finish(llama: Path, tmp_path: Path, solo: SoloReference) -> None:
    # the tiny Llama keeps 2 layers x 2 kv heads x 32 dims x (k, v) x 4 bytes = 1 KiB per token; a sequence here needs
    # prompt + 40 tokens: the budget holds two of them at a time
    settings = _settings(llama, tmp_path, kv_cache_mb=100 / 1024)
    prompts = ["the movie was", "a very boring film", "once upon a time", "what is the capital", "hello there", "the music"]
    want = [solo.text(p, None, 40) for p in prompts]
    with serve(settings) as running, running.client() as c:
        backbone = llama.name
        assert complete_all_at_once(c, backbone, prompts, 40) == want
        gen = running.app.state.runtime.generation
        assert gen.peak_running == 2 and metric(c, "adapterserve_kv_cache_bytes") == 0
        too_big = c.post("/v1/completions", json={"model": backbone, "prompt": PROMPT, "max_tokens": 200})
        assert too_big.status_code == 422 and "KV cache" in too_big.json()["detail"]


def test_a_full_queue_answers_429(llama: Path, tmp_path: Path) -> None:
    settings = _settings(llama, tmp_path, max_running_sequences=1, generation_queue_size=1)
    with serve(settings) as running, running.client() as c:
        gen = running.app.state.runtime.generation
        first = Stream(running, long_body(llama.name, 230))
        assert first.first.wait(30)
        second = Stream(running, long_body(llama.name, 5))
        wait_for(lambda: gen.waiting == 1)
        r = c.post("/v1/completions", json=long_body(llama.name, 5))
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.headers["content-type"].startswith("application/problem+json")
        first.join()
        second.join()
        assert first.done.is_set() and second.done.is_set() and not second.errors


def test_hot_swap_during_a_stream_keeps_its_version_and_delete_waits(srv: Running, solo: SoloReference,
                                                                     lm_adapters: dict[tuple[str, str], Path]) -> None:
    v1, v2 = lm_adapters[("llama", "seq_bn")], lm_adapters[("llama", "prefix_tuning")]
    want1, want2 = (solo.text(PROMPT, v, 40) for v in (v1, v2))
    assert want1 != want2
    body = {"model": "swap", "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    long = {**body, "max_tokens": 230, "ignore_eos": True}  # the same greedy text, going on past any EOS
    residency = srv.app.state.runtime.residency
    with srv.client() as c:
        assert upload_files(c, "swap", v1).status_code == 201
        stream = Stream(srv, long)
        assert stream.first.wait(30)
        assert upload_files(c, "swap", v2, path="/v1/adapters/swap/versions").status_code == 201
        fresh = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert not stream.done.is_set()
        stream.join()
        assert stream.text.startswith(want1) and fresh == want2
        stream = Stream(srv, long)
        assert stream.first.wait(30)
        meta = srv.app.state.runtime.store.find("default", "swap")
        assert meta is not None and meta.version == 2
        assert c.delete("/v1/adapters/swap").status_code == 200
        assert c.post("/v1/completions", json=body).status_code == 404
        assert residency.is_resident(meta.internal) and not stream.done.is_set()  # the delete waits for the stream
        stream.join()
        assert stream.text.startswith(want2) and not stream.errors
        wait_for(lambda: not residency.is_resident(meta.internal))  # then it is unloaded


def test_a_killed_worker_ends_running_streams_with_an_error_and_the_next_requests_succeed(srv: Running, solo: SoloReference) -> None:
    engine = srv.app.state.runtime.engine
    long = Stream(srv, long_body("lora", 230))
    assert long.first.wait(30)
    os.kill(engine.pid, signal.SIGKILL)
    long.join()
    assert long.errors and long.errors[0]["type"] == "inference-failed" and long.done.is_set()
    with srv.client() as c:
        r = c.post("/v1/completions", json={"model": llama_name(srv), "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == solo.text(PROMPT, None, 8)
        assert c.post("/v1/completions", json={"model": "lora", "prompt": PROMPT, "max_tokens": 8}).status_code == 200
        assert metric(c, "adapterserve_generation_running_sequences") == 0


def llama_name(srv: Running) -> str:
    return Path(srv.settings.model_path).name


def test_a_client_that_leaves_a_plain_request_cancels_it(srv: Running) -> None:
    gen = srv.app.state.runtime.generation
    steps = gen.steps
    with srv.client(timeout=0.02) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=long_body("lora", 230))
    with srv.client() as c:
        wait_for(lambda: metric(c, "adapterserve_generation_running_sequences") == 0)
        assert metric(c, "adapterserve_kv_cache_bytes") == 0
    assert gen.steps - steps < 200


def test_generation_metrics_and_tenancy(llama: Path, tmp_path: Path, keys_file: Path, lm_adapters: dict[tuple[str, str], Path]) -> None:
    with serve(_settings(llama, tmp_path, api_keys_file=keys_file)) as running:
        with running.client("acme-key") as acme, running.client("beta-key") as beta, running.client() as anon:
            assert upload_files(acme, "mine", lm_adapters[("llama", "ia3")]).status_code == 201
            body = {"model": "mine", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
            assert anon.post("/v1/completions", json=body).status_code == 401
            assert beta.post("/v1/completions", json=body).status_code == 404
            assert beta.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "hi"}]}).status_code == 404
            assert acme.post("/v1/completions", json=body).status_code == 200
            text = acme.get("/metrics").text
    assert "adapterserve_generation_ttft_seconds_count 1.0" in text
    assert "adapterserve_generation_inter_token_seconds_count 4.0" in text
    assert "adapterserve_generated_tokens_total 5.0" in text
    assert 'adapterserve_tenant_generated_tokens_total{tenant="acme"} 5.0' in text


def test_prefix_tokens_count_against_the_kv_budget(llama: Path, tmp_path: Path, solo: SoloReference) -> None:
    # 1 KiB per token, a 100 KiB budget: two bare sequences of prompt + 40 tokens fit at once, but with a 20-token
    # prefix written before each prompt only one does; a 70-token prefix does not fit a single sequence at all
    from tests.server.gen_support import make_lm_adapter

    short = make_lm_adapter(llama, tmp_path / "p20", "prefix_tuning[prefix_length=20,bottleneck_size=16]", 7)
    long = make_lm_adapter(llama, tmp_path / "p70", "prefix_tuning[prefix_length=70,bottleneck_size=16]", 8)
    prompts = ["the movie was", "a very boring film", "once upon a time"]
    with serve(_settings(llama, tmp_path / "store", kv_cache_mb=100 / 1024)) as running, running.client() as c:
        for name, folder in (("p20", short), ("p70", long)):
            r = upload_files(c, name, folder)
            assert r.status_code == 201, r.text
        assert complete_all_at_once(c, "p20", prompts, 40) == [solo.text(p, short, 40) for p in prompts]
        assert running.app.state.runtime.generation.peak_running == 1
        too_big = c.post("/v1/completions", json={"model": "p70", "prompt": PROMPT, "max_tokens": 40})
        assert too_big.status_code == 422 and "70 prefix tokens" in too_big.json()["detail"], too_big.text
