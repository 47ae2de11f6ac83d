"""bench/generate_load.py's bookkeeping: one stream's server-sent events as the client saw them, a case's tally
over its slices, percentiles (Kaplan-Meier for TTFTs cut off by a slice's end) and Poisson arrival times."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

CONTENT = b'"delta":{"content":'  # the server's compact JSON for a content delta (the role chunk has "role" first)
SSE_END = b"\n\n"


# -- one stream's record and the server-sent events ----------------------------------------------------------
@dataclass(slots=True)
class Stream:
    """What the client saw of one request; `end` is its slice's end (events after it are not counted)."""

    sent: float
    max_tokens: int
    end: float
    first: float | None = None
    last: float | None = None
    events: int = 0  # content events inside the slice
    gaps: list[float] = field(default_factory=list)
    tokens: int | None = None  # usage.completion_tokens
    finish: str | None = None
    done: bool = False  # data: [DONE] seen
    finished_at: float | None = None
    error: str | None = None
    _buf: bytes = b""

    def feed(self, chunk: bytes) -> None:
        """One chunk of the answer: split into events (usually exactly one), time-stamped on arrival."""
        now = time.perf_counter()
        if self._buf:
            chunk, self._buf = self._buf + chunk, b""
        if chunk.endswith(SSE_END) and chunk.count(SSE_END) == 1:
            self.event(chunk[:-2], now)
            return
        *whole, self._buf = chunk.split(SSE_END)
        for ev in whole:
            self.event(ev, now)

    def event(self, ev: bytes, now: float) -> None:
        if not ev.startswith(b"data: "):
            if ev.strip():
                self.error = self.error or "malformed event"
            return
        data = ev[6:]
        if CONTENT in data:  # the common case: no JSON parse
            if now <= self.end:
                if self.first is None:
                    self.first = now
                else:
                    assert self.last is not None
                    self.gaps.append(now - self.last)
                self.last = now
                self.events += 1
            return
        if data == b"[DONE]":
            self.done = True
            self.finished_at = now
            return
        try:
            obj = json.loads(data)
        except ValueError:
            self.error = self.error or "malformed event"
            return
        if "error" in obj:
            err = obj["error"]
            self.error = self.error or f"error event: {err.get('type', '?')} ({err.get('code', '?')})"
        elif obj.get("usage"):
            self.tokens = int(obj["usage"]["completion_tokens"])
        for choice in obj.get("choices") or ():
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def verdict(self) -> str | None:
        """Why a finished 200 stream is wrong, or None."""
        if self.error:
            return self.error
        if not self.done:
            return "no [DONE]"
        if self.finish != "length":
            return f"finish_reason {self.finish}"
        if self.tokens != self.max_tokens:
            return f"{self.tokens} of {self.max_tokens} tokens"
        return None


# -- what a case measured -----------------------------------------------------------------------------------
@dataclass
class Tally:
    tokens: int = 0
    seconds: float = 0.0
    slice_rates: list[float] = field(default_factory=list)
    ttft: list[tuple[float, bool]] = field(default_factory=list)  # (seconds, censored: no token yet at the end)
    gaps: list[float] = field(default_factory=list)
    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    server_tokens: float = 0.0
    server_itl_sum: float = 0.0
    server_itl_count: float = 0.0
    cpu: Counter[str] = field(default_factory=Counter)  # "server", "worker", "client" -> CPU seconds
    offered: int = 0  # open loop: requests sent

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def add_slice(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.slice_rates.append(tokens / seconds if seconds else 0.0)

    def add_streams(self, streams: list[Stream], end: float) -> int:
        """Fold a slice's streams in; returns the new tokens that reached the client inside it."""
        tokens = 0
        for s in streams:
            if s.error is not None and not s.done:  # failed before or mid-stream (connection, status, error event)
                self.errors[s.error] += 1
                tokens += s.events
                continue
            if s.done and s.finished_at is not None and s.finished_at <= end:
                bad = s.verdict()
                if bad:
                    self.errors[bad] += 1
                    tokens += s.events
                    continue
                self.completed += 1
                tokens += s.tokens or 0
            else:
                tokens += s.events
            if s.first is not None and s.first <= end:
                self.ttft.append((s.first - s.sent, False))
            else:
                self.ttft.append((end - s.sent, True))
            self.gaps.extend(s.gaps)
        return tokens


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by rank (the value below which a fraction q of the values lie), NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def censored_percentile(samples: list[tuple[float, bool]], q: float) -> str:
    """The q-quantile in ms of (seconds, censored) samples by Kaplan-Meier: a censored sample (a request with no
    token yet when its slice ended) says only that its TTFT exceeds its value. '>= x' (x the longest wait seen)
    when the quantile lies beyond every observed first token."""
    if not samples:
        return ""
    ordered = sorted(samples)  # at equal times an observed token (False) comes before a censored one
    survival = 1.0
    for i, (value, censored) in enumerate(ordered):
        if not censored:
            survival *= 1.0 - 1.0 / (len(ordered) - i)
            if 1.0 - survival >= q - 1e-12:
                return f"{1000 * value:.0f}"
    return f">= {1000 * ordered[-1][0]:.0f}"


def poisson_arrivals(rate: float, seconds: float, rng: random.Random) -> list[float]:
    """Arrival offsets in [0, seconds) of a Poisson process of `rate` per second."""
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out
