"""Throughput of every adapter method (one adapter for the whole batch) relative to the bare backbone.

MiniLM, batch 32 x 64 tokens, 2 threads, inference mode; all cases timed round-robin in one run, each
one between two backbone runs, and summarised by their medians. `--seq2seq`: a t5-small-shaped random
T5 (d_model 512, 6 + 6 layers), batch 16 x 64 source tokens, 32 target tokens teacher-forced.
Run: `.venv/bin/python -m bench.methods [--repeats 25] [--seq2seq]`.
"""

from __future__ import annotations

import argparse

import torch

from adapters_core import AdapterSetup, AutoAdapterModel
from bench.common import bracketed, count_flops, fixed_inputs, minilm_path, noisy, print_table, setup_threads
from bench.seq2seq import seq2seq_inputs, t5_small_shaped

CASES = {
    "seq_bn": "seq_bn",
    "double_seq_bn": "double_seq_bn",
    "par_bn": "par_bn",
    "compacter": "compacter",
    "compacter++": "compacter++",
    "prefix_tuning": "prefix_tuning",
    "lora": "lora",
    "ia3": "ia3",
    "mam": "mam",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=None, help="default 32 (MiniLM) or 16 (--seq2seq)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--target-len", type=int, default=32, help="--seq2seq: teacher-forced target tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq2seq", action="store_true", help="the t5-small-shaped encoder-decoder table")
    args = parser.parse_args()
    setup_threads(args.threads)
    if args.seq2seq:
        args.batch = args.batch or 16
        model = t5_small_shaped()
        inputs = seq2seq_inputs(args.batch, args.seq_len, args.target_len)
        what = f"t5-small-shaped T5, batch {args.batch} x {args.seq_len} source, {args.target_len} target tokens"
    else:
        args.batch = args.batch or 32
        model = AutoAdapterModel.from_pretrained(minilm_path()).eval()
        inputs = fixed_inputs(args.batch, args.seq_len)
        what = f"MiniLM, batch {args.batch} x {args.seq_len}"
    for name, config in CASES.items():
        key = name.replace("+", "p")
        model.add_adapter(key, config=config)
        noisy(model, key)

    def run(setup: str | None):
        def fn() -> None:
            with torch.inference_mode(), AdapterSetup(setup):
                model(**inputs)
        return fn

    # the control runs the backbone again: its ratio shows how far this machine's noise moves a ratio
    cases = {"backbone": run(None), "backbone (control)": run(None)}
    cases |= {name: run(name.replace("+", "p")) for name in CASES}
    flops = {name: count_flops(fn) for name, fn in cases.items()}
    times, ratios = bracketed(cases, "backbone", args.repeats)
    share = {name: f"{flops[name] / flops['backbone']:.3f}" for name in cases}
    bound = {name: f"{flops['backbone'] / flops[name]:.3f}" for name in cases}
    print_table(
        f"bench/methods.py: {what}, {args.threads} threads, "
        f"{args.repeats} rounds, each case between two backbone runs", times, "backbone", args.batch, ratios,
        {"FLOPs vs backbone": share, "ratio if time followed FLOPs": bound},
    )


if __name__ == "__main__":
    main()
