"""bench/generate_load.py's bookkeeping (no server, no model): SSE events, tallies, Kaplan-Meier TTFT, arrivals,
and the lean client's streaming read."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from bench import generate_load as gl
from bench.http_client import KeepAliveClient


def _event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _content(text: str) -> bytes:
    return _event({"id": "x", "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]})


ROLE = _event({"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
FINISH = _event({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
DONE = b"data: [DONE]\n\n"


def _usage(n: int) -> bytes:
    return _event({"id": "x", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}})


def test_stream_counts_content_events_and_reads_usage_and_finish() -> None:
    s = gl.Stream(sent=0.0, max_tokens=3, end=float("inf"))
    for chunk in (ROLE, _content("a"), _content("b") + _content("c"), FINISH, _usage(3), DONE):  # two events in one chunk
        s.feed(chunk)
    assert (s.events, s.tokens, s.finish, s.done) == (3, 3, "length", True)
    assert len(s.gaps) == 2 and s.first is not None
    assert s.verdict() is None


def test_stream_reassembles_an_event_split_across_chunks() -> None:
    s = gl.Stream(sent=0.0, max_tokens=1, end=float("inf"))
    whole = _content("hello")
    s.feed(whole[:10])
    assert s.events == 0
    s.feed(whole[10:] + FINISH[:7])
    s.feed(FINISH[7:] + _usage(1) + DONE)
    assert (s.events, s.finish, s.tokens, s.done) == (1, "length", 1, True)


@pytest.mark.parametrize(("chunks", "why"), [
    ([_content("a"), _event({"error": {"message": "boom", "type": "inference-failed", "code": 500}}), DONE],
     "error event: inference-failed (500)"),
    ([_content("a"), FINISH, _usage(1)], "no [DONE]"),
    ([_content("a"), _event({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}), _usage(1), DONE],
     "finish_reason stop"),
    ([_content("a"), FINISH, _usage(1), DONE], "1 of 2 tokens"),
    ([b"garbage\n\n", _content("a"), FINISH, _usage(2), DONE], "malformed event"),
])
def test_stream_verdict_names_what_is_wrong(chunks: list[bytes], why: str) -> None:
    s = gl.Stream(sent=0.0, max_tokens=2, end=float("inf"))
    for chunk in chunks:
        s.feed(chunk)
    assert s.verdict() == why


def test_tally_counts_errors_cut_streams_and_censored_ttft() -> None:
    end = 10.0
    ok = gl.Stream(0.0, 2, end, first=1.0, last=2.0, events=2, gaps=[1.0], tokens=2, finish="length", done=True, finished_at=2.0)
    cut = gl.Stream(5.0, 2, end, first=6.0, last=6.0, events=1)  # still running at the end
    queued = gl.Stream(3.0, 2, end)  # no token before the end
    refused = gl.Stream(4.0, 2, end, error="HTTP 429 queue-full")
    late = gl.Stream(0.0, 2, end, first=9.0, last=11.0, events=1, tokens=2, finish="length", done=True, finished_at=11.0)
    short = gl.Stream(0.0, 2, end, first=1.0, last=1.0, events=1, tokens=1, finish="length", done=True, finished_at=1.5)
    t = gl.Tally()
    tokens = t.add_streams([ok, cut, queued, refused, late, short], end)
    assert tokens == 2 + 1 + 0 + 0 + 1 + 1
    assert t.completed == 1
    assert t.errors == {"HTTP 429 queue-full": 1, "1 of 2 tokens": 1}
    assert sorted(t.ttft) == [(1.0, False), (1.0, False), (7.0, True), (9.0, False)]


def test_kaplan_meier_percentile_without_and_with_censoring() -> None:
    plain = [(x / 1000, False) for x in range(1, 101)]
    assert gl.censored_percentile(plain, 0.5) == "50"
    assert gl.censored_percentile(plain, 0.99) == "99"
    # half the requests were still waiting after 100 ms: beyond the median nothing is known
    waiting = [(x / 1000, False) for x in range(1, 51)] + [(0.100, True)] * 50
    assert gl.censored_percentile(waiting, 0.05) == "5"
    assert gl.censored_percentile(waiting, 0.5) == "50"
    assert gl.censored_percentile(waiting, 0.6) == ">= 100"
    # those that had waited 10 ms leave the risk set there: the rest of the curve is the later ones'
    mid = [(x / 1000, False) for x in range(1, 51)] + [(0.0105, True)] * 50
    assert gl.censored_percentile(mid, 0.5) == "28"  # 0.9 x (40 - 18) / 40 < 0.5 at the 18th token after 10 ms
    # short censored waits (requests sent just before the end) do not pull the median down
    early = [(x / 1000, False) for x in range(100, 201)] + [(0.001, True)] * 100
    assert gl.censored_percentile(early, 0.5) == "150"
    assert gl.censored_percentile([], 0.5) == ""


def test_poisson_arrivals_rate_and_window() -> None:
    times = gl.poisson_arrivals(20.0, 200.0, random.Random(1))
    assert all(0 <= a < b < 200.0 for a, b in zip(times, times[1:], strict=False))
    assert len(times) / 200.0 == pytest.approx(20.0, rel=0.05)


def test_body_asks_for_exactly_max_tokens_streamed_with_usage() -> None:
    body = json.loads(gl.body_for("ad", "hi", 7))
    assert body["max_tokens"] == 7 and body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0


async def _sse_server(events: list[bytes], status: bytes = b"200 OK") -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # keep-alive: requests until the client closes
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                writer.close()
                return
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
            await reader.readexactly(length)
            if status != b"200 OK":
                body = b'{"type":"https://x/problems/queue-full"}'
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                for ev in events:
                    writer.write(f"{len(ev):x}\r\n".encode() + ev + b"\r\n")
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_post_stream_hands_over_each_chunk_and_one_request_fills_the_stream() -> None:
    events = [ROLE, _content("a"), _content("b"), FINISH, _usage(2), DONE]

    async def go() -> tuple[list[bytes], gl.Stream, gl.Stream]:
        server, port = await _sse_server(events)
        async with server:
            client = KeepAliveClient("127.0.0.1", port)
            seen: list[bytes] = []
            status, body = await client.post_stream("/v1/chat/completions", b"{}", seen.append)
            assert (status, body) == (200, b"")
            s = gl.Stream(0.0, 2, float("inf"))
            await gl.one_request(client, b"{}", s, 5)  # the same connection again
            await client.close()
        refusing, port = await _sse_server([], b"429 Too Many Requests")
        async with refusing:
            refused = gl.Stream(0.0, 2, float("inf"))
            await gl.one_request(KeepAliveClient("127.0.0.1", port), b"{}", refused, 5)
        return seen, s, refused

    seen, s, refused = asyncio.run(go())
    assert seen == events
    assert s.verdict() is None and s.events == 2
    assert refused.error == "HTTP 429 queue-full"


def test_one_request_counts_a_dead_server_as_a_connection_error() -> None:
    async def go() -> gl.Stream:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            s = gl.Stream(0.0, 2, float("inf"))
            await gl.one_request(KeepAliveClient("127.0.0.1", port), b"{}", s, 5)
        return s

    s = asyncio.run(go())
    assert s.error is not None and s.error.startswith("connection")


def test_a_cancelled_stream_keeps_what_arrived_and_drops_its_connection() -> None:
    async def go() -> tuple[gl.Stream, bool]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            ev = _content("a")
            writer.write(f"{len(ev):x}\r\n".encode() + ev + b"\r\n")
            await writer.drain()
            await reader.read()  # then nothing more until the client hangs up
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            client = KeepAliveClient("127.0.0.1", server.sockets[0].getsockname()[1])
            s = gl.Stream(0.0, 2, float("inf"))
            task = asyncio.ensure_future(gl.one_request(client, b"{}", s, 30))
            while s.events == 0:
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return s, client._writer is None

    s, dropped = asyncio.run(go())
    assert s.events == 1 and s.error is None and not s.done
    assert dropped
