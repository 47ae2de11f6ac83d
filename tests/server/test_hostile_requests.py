"""Hostile requests (issue 12, request side): none may crash, hang, starve others or blow up memory.

Each answer is a 4xx problem+json whose detail names what was wrong and, for a limit, which one and by how much.
Clients carry timeouts, so a regression fails instead of hanging; nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters_core.composition import Average, BatchSplit, Fuse, Parallel, Stack
from server.errors import DeadlineExceeded
from server.scheduling.cost import Shape, shape_of, token_passes
from tests.server.conftest import Running, serve, settings_for, upload_files
from tests.server.test_batcher import _job, gated_batcher
from tests.server.test_lifecycle import _gated, _wait_metric

pytestmark = pytest.mark.slow

WIDE_PARALLEL = {"inputs": [("a " * 62)] * 64, "adapters": {"parallel": ["a"] * 50}}
DEEP_STACK = {"inputs": ["hello world"], "adapters": {"stack": ["d"] * 998}}


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
        adapter_factory: Callable[[str, int], Path]) -> Iterator[Running]:
    settings = settings_for(
        tiny_model_dir, tmp_path_factory.mktemp("store-hostile"), max_request_cost=15_000, max_response_values=4096,
        header_timeout_s=1, body_timeout_s=1, min_body_rate_kib_s=4,
    )
    with serve(settings) as running, running.client() as c:
        for i, name in enumerate(("a", "b", "d")):
            assert upload_files(c, name, adapter_factory("seq_bn", 120 + i)).status_code == 201
        yield running


def _problem(r: httpx.Response, status: int, *needles: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    detail: str = r.json()["detail"]
    for needle in needles:
        assert needle in detail, detail
    return detail


def _post(srv: Running, path: str, body: Any, timeout: float = 30) -> httpx.Response:
    """POST with the body encoded as JSON here (json.dumps escapes lone surrogates, httpx would refuse them)."""
    with srv.client(timeout=timeout) as c:
        return c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def _beside_a_normal_request(srv: Running, hostile: dict[str, Any]) -> httpx.Response:
    """Send `hostile` and, while it is handled, a normal request, which must still answer 200."""
    with cf.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(_post, srv, "/v1/infer", hostile)
        good = pool.submit(_post, srv, "/v1/infer", {"inputs": ["the movie was great"], "adapters": "b"})
        assert good.result().status_code == 200
        return bad.result()


# -- finding 2 and 3: the request cost model and composition limits ---------------------------------------------
def test_wide_parallel_is_refused_before_it_is_queued(srv: Running) -> None:
    _problem(_beside_a_normal_request(srv, WIDE_PARALLEL), 413, "composition width 50 exceeds max_composition_width 8")


def test_deep_stack_is_refused_before_it_is_queued(srv: Running) -> None:
    _problem(_beside_a_normal_request(srv, DEEP_STACK), 413, "composition depth 998 exceeds max_composition_depth 8")


def test_adapter_applications_count_repeats(srv: Running) -> None:
    body = {"inputs": ["fun"], "adapters": {"parallel": [{"stack": ["a"] * 5}] * 8}}  # depth 5, width 8
    _problem(_post(srv, "/v1/infer", body), 413, "adapter application count 40 exceeds max_adapter_applications 32")


def test_request_cost_and_response_size_are_bounded(srv: Running) -> None:
    rows = [("a " * 62)] * 64  # 64 tokens each with [CLS] and [SEP]
    r = _post(srv, "/v1/infer", {"inputs": rows, "adapters": {"parallel": ["a", "b", "d"]}})
    _problem(r, 413, "request cost 15360 exceeds max_request_cost 15000 (over by 360)", "64 inputs x 64 tokens",
             "(3 copies + 3 adapter applications / 4)")
    r = _post(srv, "/v1/infer", {"inputs": ["a"] * 64, "adapters": {"parallel": ["a", "b", "d"]}})
    _problem(r, 413, "response of 6144 numbers exceeds max_response_values 4096", "64 inputs x 96 numbers")
    assert _post(srv, "/v1/infer", {"inputs": rows, "adapters": {"stack": ["a", "b"]}}).status_code == 200
    r = _post(srv, "/v1/embeddings", {"model": "a", "input": rows})
    assert r.status_code == 200, r.text


def test_shape_counts_depth_width_and_applications() -> None:
    assert shape_of("a") == Shape(1, 1, 1)
    assert shape_of(Stack(*["d"] * 998)) == Shape(998, 1, 998)
    assert shape_of(Parallel(*["a"] * 50)) == Shape(1, 50, 50)
    assert shape_of(Stack(Parallel("a", "b"), "c")) == Shape(2, 2, 4)  # c runs on both copies
    assert shape_of(Stack(Parallel("a", "b"), Parallel("c", "d"))) == Shape(2, 4, 6)
    assert shape_of(Stack(Fuse("a", "b"), "c")) == Shape(3, 1, 4)  # the fusion layer is one more module
    assert shape_of(Average("a", Stack("b", "c"), weights=[1, 1])) == Shape(2, 1, 3)
    assert shape_of(BatchSplit("a", None, batch_sizes=[1, 1])) == Shape(1, 1, 1)
    assert token_passes([[1] * 10, [1] * 4], Shape(2, 2, 4)) == 2 * 10 * (2 + 4 / 4)
    assert token_passes([[1] * 3], Shape(1, 1, 1)) == 3 + 1  # the applications' quarter passes, rounded up


# -- finding 5: tokenization never runs on the event loop ---------------------------------------------------------
def test_tokenize_never_runs_on_the_event_loop(srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.execution.engine import Backbone

    calls: list[tuple[str, bool]] = []
    for method in ("tokenize", "tokenize_truncated", "tokenize_capped"):
        real = getattr(Backbone, method)

        def spy(*args: object, _real: Callable[..., object] = real, _name: str = method, **kwargs: object) -> object:
            try:
                asyncio.get_running_loop()
                calls.append((_name, True))
            except RuntimeError:
                calls.append((_name, False))
            return _real(*args, **kwargs)

        monkeypatch.setattr(Backbone, method, spy)
    long_text = "film " * 300
    assert _post(srv, "/v1/infer", {"inputs": ["fun", long_text], "adapters": "a", "truncate": True}).status_code == 200
    assert _post(srv, "/v1/embeddings", {"model": "a", "input": ["fun"]}).status_code == 200
    assert "tokenize_capped" in {name for name, _ in calls}
    assert not [name for name, on_loop in calls if on_loop], calls


def test_capped_tokens_match_the_tokenizers_truncation(srv: Running) -> None:
    """One tokenizer pass gives what the HF tokenizer's truncation gives, and the untruncated length."""
    engine = srv.app.state.runtime.engine
    texts = ["fun", "the movie was great " * 40, "UPPER case, punctuation! [CLS] " * 30, "", "zzqx " * 500]
    for limit in (3, 16, 128):
        got = engine.tokenize_capped(texts, limit)
        want = engine.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=limit)["input_ids"]
        assert [ids for ids, _ in got] == [list(w) for w in want]
        assert [length for _, length in got] == [len(ids) for ids in engine.tokenize(texts)]


def test_healthz_answers_while_long_texts_are_tokenized(srv: Running) -> None:
    """Eight concurrent requests, each one ~1 MB text with truncate (on the loop, about 0.4 s of tokenizing each):
    /healthz keeps answering within its client's 2 s timeout (the deploy's readiness probe allows 3 s)."""
    body = {"inputs": ["film " * 200_000], "adapters": "a", "truncate": True}
    stop = threading.Event()
    answers: list[int | str] = []

    def poll() -> None:
        with srv.client(timeout=2) as c:
            while not stop.is_set():
                try:
                    answers.append(c.get("/healthz").status_code)
                except httpx.TimeoutException:
                    answers.append("timeout")
                time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: _post(srv, "/v1/infer", body, timeout=120), range(8)))
    finally:
        stop.set()
        poller.join(10)
    assert [r.status_code for r in results] == [200] * 8, results[0].text
    assert all(r.json()["results"][0]["truncated"] for r in results)
    assert answers and set(answers) == {200}, answers


# -- finding 6: slow clients are cut off --------------------------------------------------------------------------
def _connect(srv: Running) -> socket.socket:
    host, port = srv.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)  # generous: the server's timeouts are 1 s
    return sock


def _read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_unfinished_headers_are_cut_off(srv: Running) -> None:
    with _connect(srv) as idle, _connect(srv) as partial:
        partial.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Ty")
        for sock in (idle, partial):
            answer = _read_to_eof(sock)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"header_timeout_s 1s" in answer


def test_oversized_headers_are_refused(srv: Running) -> None:
    from server.http.read_deadlines import MAX_HEADER_BYTES

    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: "
    with _connect(srv) as sock:  # one byte over the cap and no more, so the server reads all before it closes
        sock.sendall(head + b"p" * (MAX_HEADER_BYTES + 1 - len(head)))
        answer = _read_to_eof(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def _trickle(srv: Running, first: bytes, seconds: float) -> tuple[bool, bytes]:
    """Send `first`, then a byte every 0.25 s until the server closes the connection; (closed, what it answered)."""
    answer = b""
    with _connect(srv) as sock:
        sock.sendall(first)
        sock.settimeout(0.25)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(b"a")
                except (BrokenPipeError, ConnectionResetError):
                    return True, answer
                continue
            except ConnectionResetError:
                return True, answer
            if not chunk:
                return True, answer
            answer += chunk
    return False, answer


MULTIPART_START = b'--xx\r\nContent-Disposition: form-data; name="files"; filename="adapter.safetensors"\r\n\r\n'


@pytest.mark.parametrize("path, ctype, start", [("/v1/adapters", "multipart/form-data; boundary=xx", MULTIPART_START),
                                                ("/v1/infer", "application/json", b'{"inputs": ["')], ids=["upload", "infer"])
def test_slow_body_is_answered_408_and_closed(srv: Running, path: str, ctype: str, start: bytes) -> None:
    """A body trickling in at 4 B/s (a minimum of 4 KiB/s after 1 s) is cut off. Bytes sent after the server closed
    may reset the connection before its answer is read, so the 408 is checked in the metrics as well."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: 100000\r\n\r\n"
    closed, answer = _trickle(srv, head.encode() + start, seconds=30)
    assert closed, "the server kept reading a body that arrives at 4 bytes a second"
    if answer:
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"min_body_rate_kib_s 4 KiB/s" in answer and b"connection: close" in answer.lower()
    with srv.client(timeout=10) as c:
        assert f'adapterserve_requests_total{{route="{path}",status="408"}}' in c.get("/metrics").text


def test_an_answer_before_the_body_closes_the_connection(srv: Running) -> None:
    """The body that was never read cannot keep the connection: a 415 sent before it arrives closes it."""
    with _connect(srv) as sock:
        sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n")
        answer = _read_to_eof(sock)
    assert answer.startswith(b"HTTP/1.1 415 ") and b"connection: close" in answer.lower(), answer


# -- finding 8: 500s that are the caller's mistake -----------------------------------------------------------------
def test_lone_surrogates_are_422_naming_the_input(srv: Running) -> None:
    r = _post(srv, "/v1/infer", {"inputs": ["fun", "a\ud800b"], "adapters": "a"})
    _problem(r, 422, "input 1", "surrogate", "U+D800")
    r = _post(srv, "/v1/embeddings", {"model": "a", "input": ["\udfff"]})
    _problem(r, 422, "input 0", "U+DFFF")


def test_overflowing_average_weights_are_422(srv: Running) -> None:
    for weights in ([1e308, 1e308], [10**3999, 1]):
        body = {"inputs": ["fun"], "adapters": {"average": ["a", "b"], "weights": weights}}
        _problem(_post(srv, "/v1/infer", body), 422, "weights", "finite")


def test_deeply_nested_body_is_413_naming_the_depth_limit(srv: Running) -> None:
    nested = b"[" * 1000 + b'"a"' + b"]" * 1000  # a composition 1000 lists deep (json.dumps cannot write it)
    with srv.client(timeout=30) as c:
        r = c.post("/v1/infer", content=b'{"inputs": ["fun"], "adapters": ' + nested + b"}",
                   headers={"content-type": "application/json"})
    _problem(r, 413, "JSON nesting depth 1001 exceeds max_json_depth 32")
    within: Any = "a"
    for _ in range(18):
        within = [within]
    _problem(_post(srv, "/v1/infer", {"inputs": ["fun"], "adapters": within}), 422, "composition too large")


# -- finding 9: clear answers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body", [("/v1/infer", {"inputs": ["fun"], "adapters": "a"}),
                                        ("/v1/embeddings", {"model": "a", "input": "fun"})])
def test_json_routes_take_only_json(srv: Running, path: str, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    with srv.client(timeout=30) as c:
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"):
            _problem(c.post(path, content=raw, headers={"content-type": ctype}), 415, path, "application/json")
        _problem(c.post(path, content=raw), 415, "no Content-Type")
        for ctype in ("application/json", "application/json; charset=utf-8", "application/foo+json"):
            r = c.post(path, content=raw, headers={"content-type": ctype})
            assert r.status_code == 200, (ctype, r.text)


def test_queued_job_is_answered_at_its_deadline() -> None:
    """While the batch ahead of it is still held, a queued job past its deadline is answered DeadlineExceeded."""

    async def main() -> list[list[str]]:
        async with gated_batcher(max_batch_size=1, max_wait_s=0) as (b, rec, gate):
            blocker = b.submit(_job(1, adapter="blocker"))
            await asyncio.sleep(0.05)
            late = b.submit(_job(1, adapter="late", deadline_s=0.2))
            with pytest.raises(DeadlineExceeded, match="in the queue without starting"):
                await asyncio.wait_for(late, 10)
            assert not gate.is_set() and not blocker.done()
            assert b.depth == 0
            gate.set()
            await blocker
        return [[j.payload for j in c] for c in rec.calls]

    assert asyncio.run(main()) == [["blocker"]]


def test_504_arrives_at_the_deadline_and_states_it(tiny_model_dir: Path, tmp_path: Path,
                                                   adapter_factory: Callable[[str, int], Path]) -> None:
    gate = threading.Event()
    settings = settings_for(tiny_model_dir, tmp_path / "store", max_batch_size=1, max_wait_ms=0, request_timeout_s=1.0)
    try:
        with serve(settings, _gated(gate)) as srv, srv.client() as c:
            assert upload_files(c, "d", adapter_factory("seq_bn", 15)).status_code == 201
            with cf.ThreadPoolExecutor(2) as pool:
                first = pool.submit(_post, srv, "/v1/infer", {"inputs": ["fun"], "adapters": "d"})
                _wait_metric(c, "adapterserve_requests_in_flight 1.0")
                late = pool.submit(_post, srv, "/v1/infer", {"inputs": ["fun"], "adapters": "d"})
                r = late.result(timeout=20)  # the gate is still closed
                assert not first.done()
                gate.set()
                assert first.result().status_code == 200
    finally:
        gate.set()
    _problem(r, 504, "deadline", "request_timeout_s 1s")
