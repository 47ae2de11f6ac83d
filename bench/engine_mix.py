"""What the server's batches cost the model: the engine on batches shaped like bench/scale.py's, with and without
their adapters, in this process (no HTTP, no other process on the cores).

Each batch is 32 of bench/serve_load.py's short texts, each row's adapter drawn with Zipf(1.1) popularity from
`--adapters` adapters (seq_bn, LoRA, prefix tuning, as bench/scale.py makes them), rows grouped by adapter as the
runner groups jobs, cut into up to two passes by length as the server's defaults do. The same batch also runs
with no adapter on any row ("none"). Each round times one batch bare, with its adapters and bare again, with the
server's default two torch threads; the table gives the median ratio. With `--methods`, one row per method
alone (its adapters only) follows the mix.

    .venv/bin/python bench/engine_mix.py [--adapters 100] [--repeats 30]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import median_ms  # noqa: E402
from bench.scale import make_many  # noqa: E402
from bench.serve_load import CONFIGS, sentences, zipf_weights  # noqa: E402
from server.execution.engine import Engine, Segment  # noqa: E402
from server.settings import default_model_path  # noqa: E402

BATCH = 32


def batches(names: list[str], rows_of: dict[str, list[int]], texts: list[str], n: int, seed: int = 0) -> list[list[Segment]]:
    """n batches of BATCH rows, adapters drawn by Zipf popularity over `names` (first = most popular)."""
    rng, weights = random.Random(seed), zipf_weights(len(names), 1.1)
    out = []
    for _ in range(n):
        segs: list[Segment] = []
        for name, text in sorted(zip(rng.choices(names, weights, k=BATCH), rng.sample(texts, BATCH), strict=True)):
            if segs and segs[-1].block == name:
                segs[-1].rows.append(rows_of[text])
            else:
                segs.append(Segment(name, [rows_of[text]]))
        out.append(segs)
    return out


def measure(engine: Engine, work: list[list[Segment]], repeats: int) -> tuple[float, float, float]:
    """(median ms none, median ms mixed, median ratio none/mixed): per round one batch of `work`, timed bare,
    with its adapters, then bare again (the ratio takes the mean of the two bare times: drift cancels)."""
    def timed(segments: list[Segment]) -> float:
        start = time.perf_counter()
        engine.embed(segments)
        return time.perf_counter() - start

    for segments in work[:2]:  # warm-up
        timed(segments)
    none_t, mixed_t, ratios = [], [], []
    for r in range(repeats):
        segments = work[r % len(work)]
        bare = [Segment(None, [row for s in segments for row in s.rows])]  # type: ignore[arg-type]
        before, mixed, after = timed(bare), timed(segments), timed(bare)
        none_t += [before, after]
        mixed_t.append(mixed)
        ratios.append((before + after) / 2 / mixed)
    return median_ms(none_t), median_ms(mixed_t), statistics.median(ratios)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--methods", action="store_true", help="also each method's adapters alone")
    p.add_argument("--model", default=default_model_path())
    args = p.parse_args(argv)
    torch.manual_seed(0)
    texts = sentences(512)
    with tempfile.TemporaryDirectory() as tmp:
        adapters, _ = make_many(args.model, Path(tmp) / "adapters", args.adapters)
        engine = Engine(args.model, "cpu", "float32", 2, 2)  # the server's defaults: slots on, 2 length buckets
        for name, folder, _ in adapters:
            engine.load(folder, name)
        rows_of = {t: engine.tokenize([t])[0] for t in texts}
        order = [a[0] for a in adapters]
        random.Random(2).shuffle(order)
        groups = {"mix of all": order}
        if args.methods:
            for config in CONFIGS:
                groups[config] = [a[0] for a in adapters if a[2] == config]
        print(f"\nEngine in-process, MiniLM, batches of {BATCH} short texts, Zipf(1.1) over the adapters, "
              f"{torch.get_num_threads()} torch threads, {args.repeats} bracketed rounds\n")
        print("| adapters | count | mean distinct per batch | none ms / batch | mixed ms / batch | mixed / none throughput |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for label, names in groups.items():
            work = batches(names, rows_of, texts, 40)
            distinct = statistics.mean(len(b) for b in work)
            none_ms, mixed_ms, ratio = measure(engine, work, args.repeats)
            print(f"| {label} | {len(names)} | {distinct:.1f} | {none_ms:.1f} | {mixed_ms:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
