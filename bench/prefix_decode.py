"""Decode-step time of the generation scheduler's running set with prefix tuning (server.execution.generator).

32 rows with 30-token prefixes (`--adapters` distinct prefix adapters, rows assigned round-robin) on a small random
Llama (8 layers, hidden 256, 8 heads, 2 kv heads, tied embeddings): all prompts are prefilled in one step, then each
`Generator.step` is one decode forward over the 32 rows. It prints the median and mean of the timed steps. Only the
public Generator interface is used, so the same script times any checkout:

    PYTHONPATH=. python bench/prefix_decode.py [--adapters 8] [--steps 40] [--threads 1] [--compare]

--compare also runs, in the same process and step by step in alternation (so a busy machine slows both alike), a
second running set whose prefixes are not written into the cache: the attention wrapper prepends them at every
forward, as the generator did before it kept prefixes in its cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig

from adapters_core import AutoAdapterModel
from bench.common import noisy
from server.execution.generator import Generator, Limits, Sampling, SeqSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare", action="store_true", help="alternate with a running set that prepends prefixes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    model = AutoAdapterModel.from_config(cfg).eval()
    for i in range(args.adapters):
        model.add_adapter(f"p{i}", "prefix_tuning")  # prefix_length=30
        noisy(model, f"p{i}", seed=i)
    g = torch.Generator().manual_seed(1)
    greedy = Sampling(temperature=0, ignore_eos=True)
    n_new = args.warmup + args.steps + 2
    specs = [SeqSpec(r, tuple(torch.randint(3, 1000, (args.prompt,), generator=g).tolist()), f"p{r % args.adapters}",
                     n_new, greedy) for r in range(args.rows)]
    limits = Limits(1 << 30, args.rows, prefill_chunk=args.rows * args.prompt)
    cases = {"prefixes in the cache": Generator(model, "/nonexistent", torch.device("cpu"), torch.float32)}
    if args.compare:
        cases["prefixes prepended per forward"] = Generator(model, "/nonexistent", torch.device("cpu"), torch.float32)
    for label, gen in cases.items():
        if label.startswith("prefixes prepended"):
            model.cached_prefix = lambda *a, **k: None  # looked up at admission only: these rows stay uncached
        gen.step(specs, [], limits)  # every prompt in one prefill forward, then the first decode
        model.__dict__.pop("cached_prefix", None)
        for _ in range(args.warmup):
            gen.step([], [], limits)
    times: dict[str, list[float]] = {label: [] for label in cases}
    order = list(cases)
    for _ in range(args.steps):
        for label in order:
            start = time.perf_counter()
            result = cases[label].step([], [], limits)
            times[label].append(time.perf_counter() - start)
            assert result.decoded == args.rows
        order.reverse()
    for label, ts in times.items():
        print(f"{label}: {args.rows} rows, {args.adapters} prefix adapter(s) x 30 tokens, {args.prompt}-token prompts, "
              f"{args.threads} thread(s): decode step median {1e3 * statistics.median(ts):.2f} ms, "
              f"mean {1e3 * statistics.mean(ts):.2f} ms over {args.steps} steps")
    if args.compare:
        a, b = (statistics.median(ts) for ts in times.values())
        print(f"prepending / cached median: {b / a:.2f}x")

if __name__ == "__main__":
    main()
