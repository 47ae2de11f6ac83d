"""Heterogeneous batches: throughput when one batch holds 1, 8 or 32 distinct adapters.

MiniLM, batch 32 x 64 tokens, 2 threads, inference mode, all cases timed round-robin in one run,
median of the repeats. Ratios are to the one-adapter case of the same method (the DESIGN target:
32 distinct adapters >= 0.95 of one adapter) and to the bare backbone.
Run: `.venv/bin/python -m bench.mixed_batch [--repeats 7]`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from adapters_core import AdapterSetup, AutoAdapterModel, BatchSplit
from bench.common import fixed_inputs, median_ms, minilm_path, noisy, paired_ratio, round_robin, setup_threads

METHODS = {
    "seq_bn": "seq_bn",
    "lora": "lora",
    "prefix_tuning": "prefix_tuning[prefix_length=30]",
}
MIX = ("seq_bn", "lora", "prefix_tuning", "compacter++")


def runner(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[object], Callable[[], None]]:
    """setup -> a case that runs one inference forward of `inputs` under it."""
    def run(setup: object) -> Callable[[], None]:
        def fn() -> None:
            with torch.inference_mode(), AdapterSetup(setup):
                model(**inputs)
        return fn
    return run


def split(adapters: Sequence[str], batch: int) -> BatchSplit:
    """A BatchSplit giving `batch` rows to `adapters` as evenly as possible (contiguous runs, in order)."""
    n = len(adapters)
    return BatchSplit(*adapters, batch_sizes=[batch // n + (i < batch % n) for i in range(n)])


def mix_key(mix: Sequence[str]) -> str:
    return f"mix of {len(mix)} methods: 1 adapter each"


def build_cases(run: Callable[[object], Callable[[], None]], names: dict[str, list[str]], methods: Sequence[str],
                mix: Sequence[str], batch: int, counts: Sequence[int]) -> dict[str, Callable[[], None]]:
    """The cases: bare backbone; per method one adapter and BatchSplits over `counts` distinct ones (capped at
    the adapters it has); the `mix` methods with one adapter each, and `batch` distinct adapters drawn from
    them in turn (as many as they have)."""
    cases: dict[str, Callable[[], None]] = {"backbone": run(None)}
    for method in methods:
        pool = names[method]
        cases[f"{method}: 1 adapter"] = run(pool[0])
        for n in dict.fromkeys(min(c, len(pool), batch) for c in counts):
            if n > 1:
                cases[f"{method}: {n} distinct"] = run(split(pool[:n], batch))
    k = len(mix)
    mixed = [names[mix[i % k]][i // k] for i in range(batch) if i // k < len(names[mix[i % k]])]
    cases[mix_key(mix)] = run(split([names[m][0] for m in mix], batch))
    cases[f"mix of {k} methods: {len(mixed)} distinct"] = run(split(mixed, batch))
    return cases


def print_ratios(title: str, times: dict[str, list[float]], batch: int, mix: Sequence[str]) -> None:
    """A markdown table: per case its median, spread, rows/s and throughput ratios to the one-adapter case of
    its method (of medians, and the median of per-round ratios) and to the bare backbone."""
    base = median_ms(times["backbone"])
    print(f"\n{title}")
    print("| case | median ms / batch | min-max ms | rows/s | ratio to 1 adapter (of medians) | "
          "ratio to 1 adapter (median of per-round ratios) | ratio to backbone |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, samples in times.items():
        ms = median_ms(samples)
        one_key = name.split(":")[0] + ": 1 adapter"
        if name.startswith("mix"):
            one_key = mix_key(mix)
        if one_key not in times:
            one_key = name
        spread = f"{min(samples) * 1000:.1f}-{max(samples) * 1000:.1f}"
        print(f"| {name} | {ms:.2f} | {spread} | {batch * 1000.0 / ms:.0f} | {median_ms(times[one_key]) / ms:.3f} | "
              f"{paired_ratio(times, name, one_key):.3f} | {base / ms:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup_threads(args.threads)
    b = args.batch
    model = AutoAdapterModel.from_pretrained(minilm_path()).eval()
    inputs = fixed_inputs(b, args.seq_len)
    names: dict[str, list[str]] = {}
    for method, config in {**METHODS, "compacter++": "compacter++"}.items():
        key = method.replace("+", "p")
        names[method] = []
        for i in range(b):
            name = f"{key}_{i}"
            model.add_adapter(name, config=config)
            noisy(model, name, seed=i)
            names[method].append(name)
    cases = build_cases(runner(model, inputs), names, list(METHODS), MIX, b, (8, b))
    times = round_robin(cases, args.repeats)
    print_ratios(f"bench/mixed_batch.py: MiniLM, batch {b} x {args.seq_len}, {args.threads} threads, "
                 f"{args.repeats} round-robin rounds", times, b, MIX)


if __name__ == "__main__":
    main()
