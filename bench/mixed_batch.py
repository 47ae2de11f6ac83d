"""Heterogeneous batches: throughput when one batch holds 1, 8 or 32 distinct adapters.

MiniLM, batch 32 x 64 tokens, 2 threads, inference mode, all cases timed round-robin in one run,
median of the repeats. Ratios are to the one-adapter case of the same method (the DESIGN target:
32 distinct adapters >= 0.95 of one adapter) and to the bare backbone.
Run: `.venv/bin/python -m bench.mixed_batch [--repeats 7]`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from adapters_core import AdapterSetup, AutoAdapterModel, BatchSplit
from bench.common import fixed_inputs, median_ms, minilm_path, noisy, paired_ratio, round_robin, setup_threads

METHODS = {
    "seq_bn": "seq_bn",
    "lora": "lora",
    "prefix_tuning": "prefix_tuning[prefix_length=30]",
}
MIX = ("seq_bn", "lora", "prefix_tuning", "compacter++")


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

    def run(setup: object) -> Callable[[], None]:
        def fn() -> None:
            with torch.inference_mode(), AdapterSetup(setup):
                model(**inputs)
        return fn

    def split(adapters: list[str]) -> BatchSplit:
        return BatchSplit(*adapters, batch_sizes=[b // len(adapters)] * len(adapters))

    cases: dict[str, Callable[[], None]] = {"backbone": run(None)}
    for method in METHODS:
        pool = names[method]
        cases[f"{method}: 1 adapter"] = run(pool[0])
        cases[f"{method}: 8 distinct"] = run(split(pool[:8]))
        cases[f"{method}: {b} distinct"] = run(split(pool[:b]))
    mixed = [names[MIX[i % len(MIX)]][i] for i in range(b)]
    cases[f"mix of {len(MIX)} methods: 1 adapter each"] = run(split([names[m][0] for m in MIX]))
    cases[f"mix of {len(MIX)} methods: {b} distinct"] = run(split(mixed))
    times = round_robin(cases, args.repeats)
    base = median_ms(times["backbone"])
    print(f"\nbench/mixed_batch.py: MiniLM, batch {b} x {args.seq_len}, {args.threads} threads, "
          f"{args.repeats} round-robin rounds")
    print("| case | median ms / batch | min-max ms | rows/s | ratio to 1 adapter (of medians) | "
          "ratio to 1 adapter (median of per-round ratios) | ratio to backbone |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, samples in times.items():
        ms = median_ms(samples)
        one_key = name.split(":")[0] + ": 1 adapter"
        if name.startswith("mix"):
            one_key = f"mix of {len(MIX)} methods: 1 adapter each"
        if one_key not in times:
            one_key = name
        spread = f"{min(samples) * 1000:.0f}-{max(samples) * 1000:.0f}"
        print(f"| {name} | {ms:.1f} | {spread} | {b * 1000.0 / ms:.0f} | {median_ms(times[one_key]) / ms:.3f} | "
              f"{paired_ratio(times, name, one_key):.3f} | {base / ms:.3f} |")


if __name__ == "__main__":
    main()
