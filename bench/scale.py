"""Scale benchmark: many adapters on one MiniLM server. Four figures from one run:

    .venv/bin/python bench/scale.py [--adapters 1000] [--cache-adapters 100] [--subset-adapters 100]
                                    [--duration 40] [--rounds 4] [--connections 32] [--connections-vs-bare 64]

(smoke test: --adapters 30 --cache-adapters 5 --subset-adapters 10 --duration 6 --rounds 2 --bare-calibrate 2)

`--adapters` MiniLM adapters (seq_bn, LoRA and prefix tuning in turn, as bench/serve_load.py makes them): three
made with adapters_core, the rest perturbed copies of their safetensors files, uploaded over HTTP. Three real
servers (`python -m server.cli serve` on 127.0.0.1, CPU, their inference worker process), loaded with
bench/serve_load.py's closed-loop keep-alive clients (POST /v1/infer, one short text per request, Zipf(--zipf)
adapter popularity over one fixed popularity order):

  A  all adapters in a store it shares with B; --adapter-cache-mb holds ~--cache-adapters of them (their mean
     size times that many, plus the stack cache)
  B  the same store; a cache that holds them all, warmed until all are loaded
  C  default settings; its own store of the --subset-adapters most popular adapters (warmed: all resident)

and the bare backbone in-process (plain transformers, --bare-threads torch threads, the same texts; its batch
size and whether it cuts batches by input length as the server does are picked by a short calibration first).
A and B are given the stack cache C has by default, so the three differ only in what the figures compare.

Cases, each `--duration` seconds in `--rounds` slices interleaved in a fresh order every round (one server under
load at a time; the others idle, with their connections closed):
  A-all   Zipf over all adapters on A, --connections          1. A-all / B-all       target >= 0.80
  B-all   Zipf over all adapters on B, --connections          2. B-all / C-sub       target >= 0.90
  C-sub   Zipf over the subset on C, --connections               (1000 resident vs 100 resident, same traffic shape)
  C-sub64 the same at --connections-vs-bare                   4. C-sub64 / bare      target >= 0.90
  bare    in-process bare backbone
  3. cold-load p50 < 5 ms and p99 < 20 ms, from the adapterserve_adapter_load_seconds histogram of server A
     (the loads during its measured slices: cache full, evicting) and of server B (its warm-up: loading while 0
     to all adapters are resident); summed over any labels, and per method when it has a `method` label;
     quantiles interpolated inside buckets as Prometheus' histogram_quantile does. The extra latency of the
     request that caused a load is not observable client-side; only the histogram is reported.

Prints markdown tables: per case throughput (inputs/s), its range over the slices, p50/p99 latency, non-200
answers, rows and distinct adapters per batch, cold loads; the load-time histogram; the four figures with
their targets and PASS/MISS (a figure whose cases had any non-200 answer is a MISS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Histogram, child_pids, histograms, multipart_body, process_cpu_seconds, prom_value  # noqa: E402
from bench.http_client import HTTPError, KeepAliveClient  # noqa: E402
from bench.serve_load import (  # noqa: E402
    CONFIGS,
    InProcess,
    Load,
    Server,
    Tally,
    make_adapters,
    percentile,
    run_async,
    sentences,
    start_server,
    stop_server,
)
from server.settings import Settings, default_model_path  # noqa: E402

MIB = 2**20
LOAD_METRIC = "adapterserve_adapter_load_seconds"
Adapter = tuple[str, Path, str]  # name, folder, config string (as serve_load's make_adapters)


# -- adapters -------------------------------------------------------------------------------------------
def make_many(model_path: str, out: Path, n: int, sigma: float = 0.02) -> tuple[list[Adapter], dict[str, int]]:
    """n adapters cycling through serve_load's CONFIGS: one made with adapters_core per config, the others copies
    of its safetensors file with the adapter name in the keys and config replaced and every tensor perturbed by
    N(0, sigma) noise (so no two files are alike). Returns the adapters and each one's weight bytes."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    bases = make_adapters(model_path, out / "_bases", min(n, len(CONFIGS)))
    width = max(4, len(str(n - 1)))
    made: list[Adapter] = []
    nbytes: dict[str, int] = {}
    for i in range(n):
        base, folder, config = bases[i % len(bases)]
        name = f"ad{i:0{width}d}"
        with safe_open(str(folder / "adapter.safetensors"), "pt") as f:
            metadata = f.metadata()
        gen = torch.Generator().manual_seed(100_000 + i)
        tensors = {}
        for key, value in load_file(str(folder / "adapter.safetensors")).items():
            renamed = key.replace(f".{base}.", f".{name}.")
            if renamed == key:
                raise RuntimeError(f"adapter name {base!r} not found in key {key!r}")
            tensors[renamed] = value + torch.randn(value.shape, generator=gen, dtype=value.dtype) * sigma
        target = out / name
        target.mkdir(parents=True)
        save_file(tensors, str(target / "adapter.safetensors"), metadata=metadata)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["name"] = name
        (target / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        nbytes[name] = sum(t.numel() * t.element_size() for t in tensors.values())
        made.append((name, target, config))
    return made, nbytes


async def upload(server: Server, adapters: list[Adapter], connections: int) -> None:
    """POST every adapter (its files as multipart) over `connections` keep-alive connections; SystemExit naming
    the failures if any upload is not answered 201."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    todo = list(reversed(adapters))
    failures: list[str] = []

    async def worker() -> None:
        client = KeepAliveClient(host, int(port), timeout=120)
        try:
            while todo:
                name, folder, _ = todo.pop()
                files = [("files", p.name, p.read_bytes()) for p in sorted(folder.iterdir())]
                body, ctype = multipart_body({"name": name}, files)
                try:
                    status, data = await client.request("POST", "/v1/adapters", body, ctype)
                except HTTPError as exc:
                    failures.append(f"{name}: no answer: {exc}")
                    continue
                if status != 201:
                    failures.append(f"{name}: {status} {data[:300]!r}")
        finally:
            await client.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    if failures:
        raise SystemExit(f"{len(failures)} of {len(adapters)} uploads to {server.url} failed; first: {failures[0]}")


# -- servers and cases ----------------------------------------------------------------------------------
@dataclass
class Case:
    label: str
    load: Load | None  # None: the in-process bare backbone
    tally: Tally = field(default_factory=Tally)
    cold_loads: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds over the measured slices, by process
    busy: float = 0.0  # seconds the server's inference thread spent in batches (inference_seconds_sum)


def _cpu_now(case: Case) -> dict[str, float]:
    """CPU seconds so far of this process (the load client, or the in-process backbone) and, for a server case, of
    the server's API process and its inference worker."""
    now = {"this process (client / bare backbone)": process_cpu_seconds(os.getpid())}
    if case.load is not None:
        pid = case.load.server.proc.pid
        now["server API process"] = process_cpu_seconds(pid)
        now["inference worker"] = sum(process_cpu_seconds(k) for k in child_pids(pid))
    return now


async def scrape(load: Load) -> str:
    status, body = await load.pool[0].get("/metrics")
    if status != 200:
        raise SystemExit(f"GET /metrics on {load.server.url} answered {status}")
    return body.decode()


async def run_slice(case: Case, seconds: float, bare: InProcess) -> None:
    if case.load is None:
        cpu0 = _cpu_now(case)
        bare.run(seconds, case.tally)
        _add_cpu(case, cpu0)
        return
    metrics0 = await scrape(case.load)
    cpu0 = _cpu_now(case)
    await case.load.run(seconds, case.tally)
    _add_cpu(case, cpu0)
    metrics1 = await scrape(case.load)
    ok = {"result": "ok"}
    case.cold_loads += prom_value(metrics1, "adapterserve_adapter_loads_total", **ok) - prom_value(metrics0, "adapterserve_adapter_loads_total", **ok)
    case.busy += prom_value(metrics1, "adapterserve_inference_seconds_sum") - prom_value(metrics0, "adapterserve_inference_seconds_sum")
    await case.load.close()  # an idle server holds no connections (they reconnect on the next slice)


def _add_cpu(case: Case, before: dict[str, float]) -> None:
    for key, value in _cpu_now(case).items():
        case.cpu[key] = case.cpu.get(key, 0.0) + value - before[key]


def calibrate(bare: InProcess, batches: list[int], buckets: list[int], seconds: float) -> tuple[dict[tuple[int, int], Tally], tuple[int, int]]:
    """Throughput of the bare backbone per (batch size, length buckets), in two interleaved passes; the best."""
    tallies = {(b, k): Tally() for b in batches for k in buckets}
    for _ in range(2):
        for (b, k), tally in tallies.items():
            bare.batch, bare.buckets = b, k
            bare.one_batch()  # warm this shape
            bare.run(seconds / 2, tally)
    best = max(tallies, key=lambda key: tallies[key].rate)
    bare.batch, bare.buckets = best
    return tallies, best


def start_servers(specs: dict[str, tuple[Path, list[str]]], model: str, work: Path) -> dict[str, Server]:
    """Start the servers one after another (each has the cores to itself while it loads); on a failure the
    started ones are stopped."""
    started: dict[str, Server] = {}
    try:
        for key, (store, extra) in specs.items():
            print(f"starting server {key} ({' '.join(extra) or 'default settings'}) ...", file=sys.stderr)
            started[key] = start_server(model, store, 32, work / f"server-{key}.log", 0, 2, extra, ready_timeout_s=600)
    except BaseException:
        for srv in started.values():
            stop_server(srv)
        raise
    return started


# -- main -----------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=1000, help="adapters registered on A and B")
    p.add_argument("--cache-adapters", type=int, default=100, help="adapters server A's cache holds (by mean size)")
    p.add_argument("--subset-adapters", type=int, default=100, help="the most popular adapters on C (figures 2, 4)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of load per case, over all rounds")
    p.add_argument("--rounds", type=int, default=4, help="slices per case; cases are interleaved round by round")
    p.add_argument("--connections", type=int, default=32, help="concurrent keep-alive clients (figures 1, 2)")
    p.add_argument("--connections-vs-bare", type=int, default=64, help="concurrent clients of C-sub64 (figure 4)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    p.add_argument("--bare-threads", type=int, default=2, help="torch threads of the in-process bare backbone")
    p.add_argument("--bare-batches", default="8,16,32,64", help="batch sizes the bare backbone's calibration tries")
    p.add_argument("--bare-calibrate", type=float, default=4.0, help="seconds per bare setting in the calibration")
    p.add_argument("--upload-connections", type=int, default=4)
    p.add_argument("--warm-connections", type=int, default=8, help="connections of the warm-up that loads every adapter")
    p.add_argument("--model", default=default_model_path())
    args = p.parse_args()
    if not 0 < args.cache_adapters <= args.adapters or not 0 < args.subset_adapters <= args.adapters:
        p.error("--cache-adapters and --subset-adapters must be between 1 and --adapters")
    torch.set_num_threads(args.bare_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.monotonic()
    texts = sentences(512)
    slice_s = args.duration / args.rounds
    defaults = Settings(model_path=args.model)  # what C runs with (the environment's ADAPTERSERVE_* included)
    stack_mb = defaults.stack_cache_bytes / MIB
    quota = ["--tenant-max-adapters", str(max(args.adapters, defaults.tenant_max_adapters))]
    timings: dict[str, float] = {}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.monotonic()
        print(f"making {args.adapters} adapters ({', '.join(CONFIGS)}) on {args.model} ...", file=sys.stderr)
        adapters, nbytes = make_many(args.model, work / "adapters", args.adapters)
        timings["make adapters"] = time.monotonic() - t
        by_name = {a[0]: a for a in adapters}
        order = [a[0] for a in adapters]
        random.Random(2).shuffle(order)  # the popularity order (first = most popular); not the config cycle
        subset = order[:args.subset_adapters]
        mean_bytes = statistics.mean(nbytes.values())
        total_mb = sum(nbytes.values()) / MIB
        cache_a = stack_mb + args.cache_adapters * mean_bytes / MIB
        cache_b = stack_mb + total_mb * 1.01 + 1.0
        subset_mb = sum(nbytes[n] for n in subset) / MIB
        if subset_mb > defaults.adapter_cache_bytes / MIB - stack_mb:
            print(f"warning: the {len(subset)} subset adapters ({subset_mb:.0f} MB) do not fit C's default cache", file=sys.stderr)
        specs = {
            "A": (work / "store-ab", ["--adapter-cache-mb", f"{cache_a:.3f}", "--stack-cache-mb", f"{stack_mb:g}", *quota]),
            "B": (work / "store-ab", ["--adapter-cache-mb", f"{cache_b:.3f}", "--stack-cache-mb", f"{stack_mb:g}", *quota]),
            "C": (work / "store-c", quota if args.subset_adapters > defaults.tenant_max_adapters else []),
        }
        bare = InProcess(args.model, texts, 32, None, args.zipf)
        t = time.monotonic()
        servers = start_servers(specs, args.model, work)
        timings["start servers"] = time.monotonic() - t
        try:
            result = run_async(measure(args, servers, by_name, order, subset, texts, bare, slice_s, timings))
        finally:
            codes = {k: stop_server(srv) for k, srv in servers.items()}
        logs = {k: (work / f"server-{k}.log").read_text() for k in servers}
    sizes = {"mean_kb": mean_bytes / 1024, "total_mb": total_mb, "cache_a": cache_a, "cache_b": cache_b,
             "stack_mb": stack_mb, "cache_c": defaults.adapter_cache_bytes / MIB,
             "by_config": {c: statistics.mean(nbytes[a[0]] for a in adapters if a[2] == c) / 1024
                           for c in dict.fromkeys(a[2] for a in adapters)}}
    report(args, result, sizes, timings)
    for key, code in codes.items():
        if code != 0:
            print(f"\nwarning: server {key} exited with {code}")
    for key, log in logs.items():
        if "Traceback" in log or " ERROR " in log:
            print(f"\nserver {key}'s log has errors (last 3000 characters):\n```\n{log[-3000:]}\n```")
    print(f"\nwall time {time.monotonic() - t_start:.0f} s", file=sys.stderr)


@dataclass
class Result:
    cases: dict[str, Case]
    calibration: dict[tuple[int, int], Tally]
    best: tuple[int, int]
    load_hist: dict[str, dict[str, Histogram]]  # row label -> method ("" = all methods) -> histogram
    resident: dict[str, float]
    load_errors: dict[str, float]
    read_ahead: dict[str, tuple[float, float]]  # server -> loads whose files were read ahead, loads read on the spot
    notes: list[str]


async def measure(args: argparse.Namespace, servers: dict[str, Server], by_name: dict[str, Adapter], order: list[str],
                  subset: list[str], texts: list[str], bare: InProcess, slice_s: float, timings: dict[str, float]) -> Result:
    notes: list[str] = []
    t = time.monotonic()
    print(f"uploading {len(order)} adapters to B (A shares its store) and {len(subset)} to C ...", file=sys.stderr)
    await upload(servers["B"], [by_name[n] for n in order], args.upload_connections)
    await upload(servers["C"], [by_name[n] for n in subset], args.upload_connections)
    timings["uploads"] = time.monotonic() - t

    def shape(clients: int) -> argparse.Namespace:
        return argparse.Namespace(zipf=args.zipf, clients=clients, inputs_per_request=1)

    cases = {
        "A-all": Case(f"A: {len(order)} adapters, cache for ~{args.cache_adapters}, {args.connections} conns",
                      Load(servers["A"], order, texts, shape(args.connections), shuffle=False)),
        "B-all": Case(f"B: {len(order)} adapters, all resident, {args.connections} conns",
                      Load(servers["B"], order, texts, shape(args.connections), shuffle=False)),
        "C-sub": Case(f"C: {len(subset)} adapters, default settings, {args.connections} conns",
                      Load(servers["C"], subset, texts, shape(args.connections), shuffle=False)),
        "C-sub64": Case(f"C: {len(subset)} adapters, default settings, {args.connections_vs_bare} conns",
                        Load(servers["C"], subset, texts, shape(args.connections_vs_bare), shuffle=False)),
        "bare": Case("bare backbone in-process", None),
    }
    loads = {k: c.load for k, c in cases.items() if c.load is not None}
    listed = json.loads((await loads["A-all"].pool[0].get("/v1/adapters"))[1])["data"]
    if len(listed) != len(order):
        raise SystemExit(f"server A lists {len(listed)} adapters of the {len(order)} uploaded to the store it shares with B")

    t = time.monotonic()
    print("warming B (every adapter once) and C ...", file=sys.stderr)
    for key, names in (("B-all", order), ("C-sub", subset)):
        # a few connections only: a batch of N adapters new to the server loads them one after another, and with
        # hundreds resident each load takes long enough that N = 32 could pass the request deadline
        warm = Load(loads[key].server, names, texts, shape(args.warm_connections), shuffle=False)
        await warm.warm_up()
        await warm.close()
    timings["warm-up loads (B, C)"] = time.monotonic() - t
    for key, want in (("B-all", len(order)), ("C-sub", len(subset))):
        got = prom_value(await scrape(loads[key]), "adapterserve_adapters_resident")
        if got != want:
            notes.append(f"after warm-up server {key[0]} had {got:.0f} adapters resident, not {want}")
        await loads[key].close()

    print(f"calibrating the bare backbone ({args.bare_threads} threads) ...", file=sys.stderr)
    t = time.monotonic()
    batches = [int(b) for b in args.bare_batches.split(",")]
    calibration, best = calibrate(bare, batches, [1, 2], args.bare_calibrate)
    timings["bare calibration"] = time.monotonic() - t

    t = time.monotonic()
    warm_s = min(5.0, slice_s)
    print(f"unmeasured traffic, {warm_s:g} s per server case (A's cache reaches its steady state) ...", file=sys.stderr)
    for key, load in loads.items():
        warm_tally = Tally()
        await load.run(warm_s, warm_tally)
        await load.close()
        if warm_tally.errors:
            notes.append(f"the unmeasured warm-up traffic of {key} had {warm_tally.errors} non-200: "
                         + "; ".join(f"{n} x {what}" for what, n in warm_tally.failures.most_common(3)))
    timings["traffic warm-up"] = time.monotonic() - t

    a_before = await scrape(loads["A-all"])
    await loads["A-all"].close()
    t = time.monotonic()
    keys = list(cases)
    rng = random.Random(0)
    for r in range(args.rounds):
        rng.shuffle(keys)  # a fresh order each round, so drift favours no case
        print(f"round {r + 1}/{args.rounds}: {', '.join(keys)}", file=sys.stderr)
        for key in keys:
            await run_slice(cases[key], slice_s, bare)
    timings["measured rounds"] = time.monotonic() - t

    texts_by_server = {k: await scrape(loads[key]) for k, key in (("A", "A-all"), ("B", "B-all"), ("C", "C-sub"))}
    for load in loads.values():
        await load.close()
    a_now, a_then = load_histograms(texts_by_server["A"]), load_histograms(a_before)
    return Result(
        cases=cases, calibration=calibration, best=best,
        load_hist={
            "A": {m: h - a_then[m] if m in a_then else h for m, h in a_now.items()},
            "B": load_histograms(texts_by_server["B"]),
            "C": load_histograms(texts_by_server["C"]),
        },
        resident={k: prom_value(text, "adapterserve_adapters_resident") for k, text in texts_by_server.items()},
        load_errors={k: prom_value(text, "adapterserve_adapter_loads_total", result="error") for k, text in texts_by_server.items()},
        read_ahead={k: (prom_value(text, "adapterserve_adapter_read_ahead_total", result="hit"),
                        prom_value(text, "adapterserve_adapter_read_ahead_total", result="miss"))
                    for k, text in texts_by_server.items()},
        notes=notes,
    )


def load_histograms(text: str) -> dict[str, Histogram]:
    """The load-time histogram summed over all its labels ("") and, if it has a `method` label, per method."""
    out = {"": sum(histograms(text, LOAD_METRIC).values(), start=Histogram([], 0.0, 0.0))}
    for labels, h in histograms(text, LOAD_METRIC, by=("method",)).items():
        if labels[0][1]:
            out[labels[0][1]] = h
    return out


# -- report ---------------------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return "" if math.isnan(seconds) else f"{1000 * seconds:.2f}"


def _bucket(lo: float, hi: float) -> str:
    return "" if math.isnan(hi) else f"({1000 * lo:g}, {'inf' if math.isinf(hi) else f'{1000 * hi:g}'}]"


def report(args: argparse.Namespace, res: Result, sizes: dict, timings: dict[str, float]) -> None:
    c = res.cases
    print(f"\n{args.adapters} adapters ({', '.join(f'{k} {v:.0f} KB' for k, v in sizes['by_config'].items())}; "
          f"mean {sizes['mean_kb']:.0f} KB, {sizes['total_mb']:.0f} MB in all), Zipf s={args.zipf}, one short text per "
          f"request (POST /v1/infer), {args.duration:g} s per case in {args.rounds} interleaved slices, MiniLM-L6, "
          f"CPU x{os.cpu_count()}. Server caches: A {sizes['cache_a']:.1f} MB, B {sizes['cache_b']:.1f} MB, "
          f"C {sizes['cache_c']:.0f} MB (default), each with a {sizes['stack_mb']:g} MB stack cache inside. "
          f"Bare backbone: {args.bare_threads} torch threads, batch {res.best[0]}, "
          f"{'cut by length like the server' if res.best[1] > 1 else 'one padded pass per batch'} (best of the calibration).\n")
    print("| case | inputs/s | slices inputs/s (min-max) | p50 ms | p99 ms | non-200 | mean rows/batch | "
          "mean distinct adapters/batch | cold loads/s | cold loads per 100 inputs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in c.values():
        t = case.tally
        lat = sorted(t.latencies)
        p50 = f"{1000 * statistics.median(lat):.1f}" if lat else ""
        p99 = f"{1000 * percentile(lat, 0.99):.1f}" if lat else ""
        spread = f"{min(t.slice_rates):.1f}-{max(t.slice_rates):.1f}"
        server = case.load is not None
        rows = f"{t.rows / t.batches:.1f}" if t.batches else ""
        distinct = f"{t.distinct / t.batches:.1f}" if t.batches and server else ""
        cold = f"{case.cold_loads / t.seconds:.1f}" if server else ""
        per100 = f"{100 * case.cold_loads / t.inputs:.1f}" if server and t.inputs else ""
        print(f"| {case.label} | {t.rate:.1f} | {spread} | {p50} | {p99} | {t.errors if server else ''} | {rows} | "
              f"{distinct} | {cold} | {per100} |")
    for case in c.values():
        for what, n in case.tally.failures.most_common(5):
            print(f"\nnon-200 in {case.label}: {n} x {what}")

    print("\nWhere the cores went during the measured slices (CPU seconds / wall seconds of each process, from /proc; "
          "worker busy: the server's `adapterserve_inference_seconds_sum` / wall seconds):\n")
    print("| case | client / bare backbone (cores) | server API process (cores) | inference worker (cores) | worker busy | "
          "worker CPU ms per input | API CPU ms per input |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in c.values():
        t = case.tally
        wall = t.seconds or 1.0
        me = case.cpu.get("this process (client / bare backbone)", 0.0)
        if case.load is None:
            print(f"| {case.label} | {me / wall:.2f} |  |  |  | {1000 * me / max(t.inputs, 1):.2f} |  |")
            continue
        api, worker = case.cpu.get("server API process", 0.0), case.cpu.get("inference worker", 0.0)
        print(f"| {case.label} | {me / wall:.2f} | {api / wall:.2f} | {worker / wall:.2f} | {case.busy / wall:.2f} | "
              f"{1000 * worker / max(t.inputs, 1):.2f} | {1000 * api / max(t.inputs, 1):.2f} |")

    print("\nBare backbone calibration (in-process, each setting "
          f"{args.bare_calibrate:g} s in two passes):\n")
    print("| batch | passes per batch | inputs/s |")
    print("| ---: | --- | ---: |")
    for (b, k), t in res.calibration.items():
        mark = " (best)" if (b, k) == res.best else ""
        passes = f"up to {k}, cut by length" if k > 1 else "one, padded"
        print(f"| {b} | {passes} | {t.rate:.1f}{mark} |")

    # figure 3: the load-time histogram
    row_labels = {
        "A": f"server A, during the measured slices (cache full: ~{args.cache_adapters} resident, evicting)",
        "B": f"server B, its warm-up (0 to {args.adapters} resident)",
        "C": f"server C, its warm-up (0 to {args.subset_adapters} resident)",
    }
    print(f"\nAdapter load time (`{LOAD_METRIC}` from each server's /metrics; quantiles interpolated linearly inside a "
          "bucket, as Prometheus' histogram_quantile does):\n")
    print("| histogram | method | loads | mean ms (sum/count) | p50 ms | p50 bucket ms | p99 ms | p99 bucket ms |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | --- |")
    for key, groups in res.load_hist.items():
        for method, h in groups.items():
            if not h.buckets or h.total == 0:
                print(f"| {row_labels[key]} | {method or 'all'} | 0 |  |  |  |  |  |")
                continue
            print(f"| {row_labels[key]} | {method or 'all'} | {h.total:.0f} | {_ms(h.sum / h.total)} | {_ms(h.quantile(0.5))} | "
                  f"{_bucket(*h.bucket_of(0.5))} | {_ms(h.quantile(0.99))} | {_bucket(*h.bucket_of(0.99))} |")
    print("\n| server | adapters resident at the end | failed loads (adapter_loads_total{result=\"error\"}) | "
          "loads with their files read ahead (adapter_read_ahead_total, whole run) |")
    print("| --- | ---: | ---: | ---: |")
    for key in res.resident:
        hit, miss = res.read_ahead.get(key, (0.0, 0.0))
        share = f" ({hit / (hit + miss):.0%})" if hit + miss else ""
        print(f"| {key} | {res.resident[key]:.0f} | {res.load_errors[key]:.0f} | {hit:.0f} of {hit + miss:.0f}{share} |")
    any_h = next((h for g in res.load_hist.values() for h in g.values() if h.buckets), None)
    if any_h is not None:
        finite = [le for le, _ in any_h.buckets if not math.isinf(le)]
        below5 = [f"{1000 * le:g}" for le in finite if le <= 0.005]
        print(f"\nBucket bounds (ms): {', '.join(f'{1000 * le:g}' for le in finite)}; {len(below5)} of them at or below "
              f"5 ms ({', '.join(below5)}).")
    if not any(m for g in res.load_hist.values() for m in g if m):
        print("The histogram has no `method` label (yet); the rows above sum over whatever labels it has.")

    # the figures
    def ratio(num: str, den: str) -> tuple[float, str]:
        a, b = c[num].tally, c[den].tally
        per_round = [x / y for x, y in zip(a.slice_rates, b.slice_rates, strict=True) if y > 0]
        return a.rate / b.rate, (f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else "")

    def verdict(ok: bool, *keys: str) -> str:
        errors = sum(c[k].tally.errors for k in keys)
        if errors:
            return f"MISS ({errors} non-200)"
        return "PASS" if ok else "MISS"

    def interpolated(h: Histogram, q: float, target_s: float) -> str:
        lo, hi = h.bucket_of(q)
        return f" (the target lies inside this quantile's bucket {_bucket(lo, hi)} ms: decided by interpolation)" \
            if lo < target_s < hi else ""

    print("\n| figure | value | per-round ratios (min-max) | target | result |")
    print("| --- | ---: | ---: | --- | --- |")
    f1, r1 = ratio("A-all", "B-all")
    print(f"| 1. throughput, cache for ~{args.cache_adapters} / cache for all {args.adapters} (A-all / B-all) | "
          f"{f1:.2f} | {r1} | >= 0.80 | {verdict(f1 >= 0.80, 'A-all', 'B-all')} |")
    f2, r2 = ratio("B-all", "C-sub")
    print(f"| 2. throughput, {args.adapters} resident / {args.subset_adapters} resident, Zipf {args.zipf:g}, "
          f"{args.connections} conns (B-all / C-sub) | {f2:.2f} | {r2} | >= 0.90 | {verdict(f2 >= 0.90, 'B-all', 'C-sub')} |")
    for key, (fa, fb) in (("A", ("3a", "3b")), ("B", ("3c", "3d"))):
        h = res.load_hist[key][""]
        where = row_labels[key].removeprefix(f"server {key}, ")
        if not h.total:
            print(f"| {fa}/{fb}. cold load p50 / p99, server {key} | no loads recorded |  | < 5 / < 20 ms | MISS |")
            continue
        p50, p99 = h.quantile(0.5), h.quantile(0.99)
        print(f"| {fa}. cold load p50, server {key} ({where}) | {_ms(p50)} ms |  | < 5 ms | "
              f"{verdict(p50 < 0.005)}{interpolated(h, 0.5, 0.005)} |")
        print(f"| {fb}. cold load p99, server {key} ({where}) | {_ms(p99)} ms |  | < 20 ms | "
              f"{verdict(p99 < 0.020)}{interpolated(h, 0.99, 0.020)} |")
    f4, r4 = ratio("C-sub64", "bare")
    print(f"| 4. throughput, server ({args.subset_adapters} adapters, defaults, {args.connections_vs_bare} conns) / "
          f"bare backbone in-process ({args.bare_threads} threads, best batch) | {f4:.2f} | {r4} | >= 0.90 | "
          f"{verdict(f4 >= 0.90, 'C-sub64')} |")
    for note in res.notes:
        print(f"\nnote: {note}")
    print("\nsetup and run times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
