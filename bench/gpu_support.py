"""bench/gpu_check.py's machinery: run sizes, the shared state of a run, printing, noise, counting host syncs."""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig


@dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    adapters: int
    batch: int  # rows of the mixed forwards
    seq: int
    streams: int  # generation
    prompt: int
    new_tokens: int
    prefix_length: int
    cold_loads: int  # per method
    repeats: int
    fidelity_rows: int
    fidelity_seq: int


FULL = Sizes(hidden=2048, layers=16, heads=16, kv_heads=4, intermediate=5632, vocab=32000, adapters=200, batch=64,
             seq=128, streams=64, prompt=32, new_tokens=64, prefix_length=30, cold_loads=6, repeats=10,
             fidelity_rows=10, fidelity_seq=64)
SMALL = Sizes(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, adapters=8, batch=8, seq=16,
              streams=8, prompt=8, new_tokens=8, prefix_length=8, cold_loads=2, repeats=3, fidelity_rows=5,
              fidelity_seq=12)

SECTIONS = {
    1: "backbone",
    2: "adapters: add and cold load",
    7: "device placement and host syncs after a mixed forward",
    3: "mixed-batch forward ratios",
    4: "generation: Generator with distinct adapters vs bare, HF generate reference",
    5: "bf16 vs float32 fidelity",
    6: "CUDA memory",
}


def out(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def table(header: list[str], rows: list[list[Any]], right: int = 1) -> None:
    """A markdown table; columns from `right` on are right-aligned (numbers)."""
    out("| " + " | ".join(header) + " |",
        "| " + " | ".join("---" if i < right else "---:" for i in range(len(header))) + " |",
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows))


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q)) if samples else float("nan")


@dataclass
class State:
    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    dtype: torch.dtype
    tmp: Path
    started: float = field(default_factory=time.perf_counter)
    config: LlamaConfig | None = None
    model: Any = None
    names: dict[str, list[str]] = field(default_factory=dict)
    memory: list[tuple[str, float, float, float]] = field(default_factory=list)
    checks: list[tuple[str, str, str]] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    _inputs: dict[str, Any] | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def check(self, name: str, ok: bool, detail: str) -> None:
        verdict = "PASS" if ok else "FAIL"
        self.checks.append((name, verdict, detail))
        out(f"- check {name}: **{verdict}** ({detail})")

    def snapshot(self, label: str) -> None:
        """CUDA memory now and its peak since the previous snapshot (MiB); printed at once as well."""
        if not self.cuda:
            self.memory.append((label, float("nan"), float("nan"), float("nan")))
            return
        self.sync()
        mib = 2.0**20
        now = torch.cuda.memory_allocated(self.device) / mib
        peak = torch.cuda.max_memory_allocated(self.device) / mib
        reserved = torch.cuda.memory_reserved(self.device) / mib
        torch.cuda.reset_peak_memory_stats(self.device)
        self.memory.append((label, now, peak, reserved))
        out(f"- memory after {label}: allocated {now:.0f} MiB, peak since previous point {peak:.0f} MiB")

    def all_names(self) -> list[str]:
        return [n for pool in self.names.values() for n in pool]

    def mixed(self, count: int) -> list[str]:
        """Up to `count` distinct adapters, the methods in turn (as bench.mixed_batch draws its mix)."""
        longest = max((len(pool) for pool in self.names.values()), default=0)
        picked = [pool[j] for j in range(longest) for pool in self.names.values() if j < len(pool)]
        return picked[:count]

    def inputs(self) -> dict[str, Any]:
        """The mixed forwards' batch: random ids, no padding, no KV cache built."""
        if self._inputs is None:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(3, self.sizes.vocab, (self.sizes.batch, self.sizes.seq), generator=g).to(self.device)
            self._inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
        return self._inputs


def noisy(model: Any, name: str, seed: int, sigma: float = 0.02) -> None:
    """Add N(0, sigma) to every parameter of adapter `name`, drawn on the parameters' own device (bench.common's
    noisy draws on the CPU, which a CUDA parameter cannot add in place)."""
    params = model.adapter_parameters(name)
    if not params:
        return
    g = torch.Generator(device=params[0].device).manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).to(p.dtype) * sigma)


@contextlib.contextmanager
def counting_syncs(state: State) -> Iterator[Counter[str]]:
    """Count the host syncs CUDA reports (torch.cuda.set_sync_debug_mode 'warn') by call site, inside the block."""
    sites: Counter[str] = Counter()
    if not state.cuda:
        yield sites
        return
    state.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on = True
        try:
            torch.cuda.set_sync_debug_mode("warn")
        except Exception as e:  # counting is a probe: the measurement around it goes on without it
            out(f"- host sync counting unavailable: {type(e).__name__}: {e}")
            on = False
        try:
            yield sites
        finally:
            if on:
                with contextlib.suppress(Exception):
                    torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            sites[f"{'/'.join(Path(w.filename).parts[-2:])}:{w.lineno}"] += 1


def sync_rows(sites: Counter[str]) -> list[list[Any]]:
    return [[site, n] for site, n in sites.most_common(8)]
