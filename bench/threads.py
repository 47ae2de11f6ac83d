"""Torch threads and forward lanes on a small node, and what the server's API process costs the forward pass. One run:

    .venv/bin/python bench/threads.py [--adapters 100] [--clients 64] [--duration 36] [--rounds 4] [--competitor-cores 0.25]

(smoke test: --adapters 6 --clients 4 --duration 4 --rounds 2)

Cases on the same texts (bench/serve_load.py's), each `--duration` seconds in `--rounds` slices interleaved in a
fresh order every round, one case at a time:

  bare-t1       the bare backbone in-process (plain transformers), 1 torch thread, batch 32 cut by length as the server
  bare-t2       the same with 2 torch threads
  bare-t2+cpu   the same beside a second process that burns `--competitor-cores` of one core in 10 ms periods, as the
                server's API process takes cores beside its inference worker (compare: the API process's cores in
                the server cases)
  bare-2x1      two Python threads, each running its own batches with 1 torch thread (what the server's forward
                lanes do with the two halves of a batch)
  bare-2x1+cpu  the same beside the burner
  server-t1     a real server (`--torch-threads 1`, defaults otherwise: one lane) with `--adapters` adapters, `--clients`
                closed-loop keep-alive connections (bench/serve_load.py's lean client), Zipf(1.1), one text per request
  server-t2     the same with `--torch-threads 2 --forward-lanes 1`: one pass at a time on both threads
  server-lanes  the same with `--torch-threads 2 --forward-lanes 2` (the default on a 2-core CPU): each batch cut into
                two parts by length, run side by side with one thread each

Prints per case the throughput, its range over the slices, the cores each process used (CPU seconds / wall seconds,
from /proc) and CPU ms per input, then ratios measured side by side: which thread and lane settings to run, what a
competitor's cores cost a 2-thread forward pass (more than their share: each op of a 2-thread pass waits for its
slower thread), and each server against the bare backbone.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import child_pids, process_cpu_seconds  # noqa: E402
from bench.serve_load import (  # noqa: E402
    InProcess,
    Load,
    Server,
    Tally,
    make_adapters,
    run_async,
    sentences,
    start_server,
    stop_server,
    upload_all,
)
from server.execution.engine import pin_threads  # noqa: E402
from server.settings import default_model_path  # noqa: E402

#: A process that keeps `share` of one core busy: spin for share * 10 ms, sleep for the rest, forever.
BURNER = """
import sys, time
busy = float(sys.argv[1]) * 0.010
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < busy:
        pass
    time.sleep(0.010 - busy)
"""


@dataclass
class Case:
    label: str
    threads: int
    server: Server | None = None  # None: the bare backbone in-process
    competitor: float = 0.0  # cores the burner process takes beside the bare backbone
    loops: int = 1  # bare: Python threads running batches side by side, `threads` torch threads each
    tally: Tally = field(default_factory=Tally)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds over the measured slices, by process


def _cpu(case: Case, burner: subprocess.Popen[bytes] | None) -> dict[str, float]:
    now = {"this process (client / bare backbone)": process_cpu_seconds(os.getpid())}
    if case.server is not None:
        pid = case.server.proc.pid
        now["server API process"] = process_cpu_seconds(pid)
        now["inference worker"] = sum(process_cpu_seconds(k) for k in child_pids(pid))
    if burner is not None:
        now["competitor"] = process_cpu_seconds(burner.pid)
    return now


def run_bare(case: Case, seconds: float, bares: list[InProcess]) -> None:
    """`case.loops` threads, each with its own copy of the bare backbone (a tokenizer is not shared across threads)."""
    parts = [Tally() for _ in range(case.loops)]

    def loop(bare: InProcess, tally: Tally) -> None:
        pin_threads(case.threads)
        bare.one_batch()  # warm this thread count
        bare.run(seconds, tally)

    threads = [threading.Thread(target=loop, args=(b, t)) for b, t in zip(bares, parts, strict=False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    case.tally.add(sum(t.inputs for t in parts), max(t.seconds for t in parts))


async def run_slice(case: Case, seconds: float, bares: list[InProcess], load: Load | None) -> None:
    burner = None
    if case.competitor > 0:
        burner = subprocess.Popen([sys.executable, "-c", BURNER, str(case.competitor)])
        time.sleep(0.2)
    try:
        before = _cpu(case, burner)
        if load is None:
            run_bare(case, seconds, bares)
        else:
            await load.run(seconds, case.tally)
        after = _cpu(case, burner)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    for key, value in after.items():
        case.cpu[key] = case.cpu.get(key, 0.0) + value - before[key]


def report(cases: dict[str, Case]) -> None:
    keys = sorted({k for c in cases.values() for k in c.cpu}, key=lambda k: ["this", "server", "inference", "competitor"].index(k.split()[0]))
    print("| case | inputs/s | slices inputs/s (min-max) | non-200 | " + " | ".join(f"{k} (cores)" for k in keys)
          + " | model CPU ms per input |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in keys) + " | ---: |")
    for c in cases.values():
        t = c.tally
        cores = [f"{c.cpu[k] / t.seconds:.2f}" if k in c.cpu else "" for k in keys]
        model = c.cpu.get("inference worker" if c.server else "this process (client / bare backbone)", 0.0)
        per_input = f"{1000 * model / t.inputs:.2f}" if t.inputs else ""
        rates = f"{min(t.slice_rates):.1f}-{max(t.slice_rates):.1f}"
        print(f"| {c.label} | {t.rate:.1f} | {rates} | {t.errors if c.server else ''} | " + " | ".join(cores) + f" | {per_input} |")

    def ratio(a: str, b: str) -> str:
        ra, rb = cases[a].tally, cases[b].tally
        per_round = [x / y for x, y in zip(ra.slice_rates, rb.slice_rates, strict=True) if y]
        return f"| {a} / {b} | {ra.rate / rb.rate:.2f} | {min(per_round):.2f}-{max(per_round):.2f} |"

    print("\n| ratio | value | per-round (min-max) |\n| --- | ---: | ---: |")
    for a, b in (("server-lanes", "server-t2"), ("server-t2", "server-t1"), ("bare-t2", "bare-t1"),
                 ("bare-t2+cpu", "bare-t2"), ("bare-2x1", "bare-t2"), ("bare-2x1+cpu", "bare-2x1"),
                 ("bare-2x1+cpu", "bare-t2+cpu"), ("server-t1", "bare-t1"), ("server-t2", "bare-t2"),
                 ("server-lanes", "bare-t2"), ("server-lanes", "bare-2x1")):
        print(ratio(a, b))
    for label in ("bare-t2+cpu", "bare-2x1+cpu"):
        burn = cases[label]
        print(f"\n{label}: the competitor asked for {burn.competitor:.2f} cores and got "
              f"{burn.cpu.get('competitor', 0) / burn.tally.seconds:.2f}.", end="")
    api = {k: c.cpu["server API process"] / c.tally.seconds for k, c in cases.items() if c.server}
    print(" The server's API process took " + ", ".join(f"{v:.2f} cores in {k}" for k, v in api.items()) + ".")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=36.0, help="seconds per case, over all rounds")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--competitor-cores", type=float, default=0.25, help="share of one core the burner process takes (0-1)")
    p.add_argument("--model", default=default_model_path())
    args = p.parse_args()
    if not 0 < args.competitor_cores < 1:
        raise SystemExit("--competitor-cores must be between 0 and 1")
    shape = argparse.Namespace(zipf=1.1, inputs_per_request=1, clients=args.clients)
    texts = sentences(512)
    slice_s = args.duration / args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"making {args.adapters} adapters on {args.model} ...", file=sys.stderr)
        adapters = make_adapters(args.model, work / "adapters", args.adapters)
        names = [a[0] for a in adapters]
        bares = [InProcess(args.model, texts, 32, None, 1.1, buckets=2) for _ in range(2)]
        for i, bare in enumerate(bares):
            bare.rng = random.Random(3 + i)  # the two loops of bare-2x1 draw different batches
        burn = args.competitor_cores
        cases = {"bare-t1": Case("bare-t1", 1), "bare-t2": Case("bare-t2", 2),
                 "bare-t2+cpu": Case("bare-t2+cpu", 2, competitor=burn), "bare-2x1": Case("bare-2x1", 1, loops=2),
                 "bare-2x1+cpu": Case("bare-2x1+cpu", 1, competitor=burn, loops=2)}
        servers: list[Server] = []
        try:
            for label, threads, lanes in (("server-t1", 1, 1), ("server-t2", 2, 1), ("server-lanes", 2, 2)):
                print(f"starting {label}: --torch-threads {threads} --forward-lanes {lanes} ...", file=sys.stderr)
                srv = start_server(args.model, work / f"store-{label}", 32, work / f"{label}.log", threads,
                                   extra_args=["--forward-lanes", str(lanes)])
                servers.append(srv)
                upload_all(srv.url, adapters)
                cases[label] = Case(label, threads, server=srv)

            async def measure() -> None:
                loads = {k: Load(c.server, names, texts, shape, shuffle=False) for k, c in cases.items() if c.server}
                for load in loads.values():
                    await load.warm_up()
                    await load.close()  # an idle server holds no connections (they reconnect on the next slice)
                order = list(cases)
                rng = random.Random(7)
                for r in range(args.rounds):
                    rng.shuffle(order)
                    print(f"round {r + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr)
                    for key in order:
                        await run_slice(cases[key], slice_s, bares, loads.get(key))
                        if key in loads:
                            await loads[key].close()

            run_async(measure())
        finally:
            for srv in servers:
                stop_server(srv)
        print(f"\n{args.adapters} adapters, {args.clients} connections, {args.duration:.0f} s per case in {args.rounds} slices; "
              f"torch {torch.__version__}, {os.cpu_count()} CPUs\n")
        report(cases)


if __name__ == "__main__":
    main()
