"""Load test of the real server: N adapters (seq_bn, LoRA, prefix tuning) on MiniLM, C concurrent clients
with Zipf adapter popularity, against the bare backbone in-process and the server with batching off.

    .venv/bin/python bench/serve_load.py [--adapters 100] [--clients 64] [--duration 30] [--rounds 3]

Five cases share one run: the bare backbone in-process (one padded pass per batch, as plain transformers
runs it), the same backbone cut into passes by input length as the server cuts its batches, the same
adapters in-process (no HTTP, one pass), the batched server and the naive server (max batch size 1).
Both servers run for the whole benchmark; each case gets `--rounds` slices of duration/rounds seconds,
interleaved in a fresh order each round, so slow drift of a shared machine hits every case alike. Prints
a markdown table: throughput (inputs/s), its range over the slices, p50/p99 latency, rows and distinct
adapters per batch, and the ratios to the bare backbone (both forms) and to the naive server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import wait_ready  # noqa: E402
from bench.http_client import HTTPError, KeepAliveClient  # noqa: E402
from server.settings import default_model_path  # noqa: E402

WORDS = (
    "the movie was great terrible boring fun acting plot story ending music score scene actor film very not really "
    "quite dark light long short love hate sad happy funny brilliant awful slow fast moving touching"
).split()
EXTRA_SERVER_ARGS: list[str] = []
CONFIGS = ("seq_bn", "lora", "prefix_tuning[prefix_length=10,bottleneck_size=64]")


def sentences(n: int, seed: int = 0) -> list[str]:
    """Short review-like texts (8-24 words), fixed by the seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) for _ in range(n)]


def make_adapters(model_path: str, out: Path, n: int) -> list[tuple[str, Path, str]]:
    """n adapters made with adapters_core, cycling through CONFIGS, with noisy weights."""
    from adapters_core import AutoAdapterModel

    model = AutoAdapterModel.from_pretrained(model_path)
    made = []
    for i in range(n):
        config = CONFIGS[i % len(CONFIGS)]
        name = f"ad{i:03d}"
        model.add_adapter(name, config=config)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.adapter_parameters(name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        model.save_adapter(str(out / name), name)
        model.delete_adapter(name)
        made.append((name, out / name, config))
    return made


@dataclass
class Tally:
    """What one case did over all its time slices."""

    inputs: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    distinct: float = 0.0  # summed distinct adapters over `batches` forward passes
    rows: float = 0.0  # summed rows over `batches` forward passes
    batches: float = 0.0
    slice_rates: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)  # what each error was: a status, or no HTTP answer

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0

    def add(self, inputs: int, seconds: float) -> None:
        self.inputs += inputs
        self.seconds += seconds
        self.slice_rates.append(inputs / seconds)


class InProcess:
    """The same inputs without HTTP: tokenize, one forward per batch of `batch`, mean-pool, L2-normalise.

    adapters=None: the bare transformers backbone (AutoModel). Otherwise adapters_core with every adapter
    loaded; each row's adapter is drawn from the Zipf popularity, rows sorted by adapter, one BatchSplit.
    buckets > 1 (bare only): each batch cut into forward passes by input length exactly as the server cuts
    its batches (server.execution.engine.length_buckets), so the server can also be compared with that.
    """

    def __init__(self, model_path: str, texts: list[str], batch: int, adapters: list[tuple[str, Path, str]] | None,
                 zipf_s: float, buckets: int = 1) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.texts, self.batch, self.buckets = texts, batch, buckets
        self.rng = random.Random(3)
        if adapters is None:
            self.model = AutoModel.from_pretrained(model_path).eval()
            self.names: list[str] = []
        else:
            from adapters_core import AutoAdapterModel

            self.model = AutoAdapterModel.from_pretrained(model_path).eval()
            self.names = [self.model.load_adapter(str(folder), load_as=name) for name, folder, _ in adapters]
            random.Random(2).shuffle(self.names)
        self.weights = zipf_weights(len(self.names), zipf_s)

    def one_batch(self) -> int:
        """Run one batch; returns its number of distinct adapters."""
        from adapters_core import AdapterSetup, BatchSplit

        groups: dict[str | None, int] = {}
        if self.names:
            rows = sorted(zip(self.rng.choices(self.names, self.weights, k=self.batch),
                              self.rng.sample(self.texts, self.batch), strict=True))
            for name, _ in rows:
                groups[name] = groups.get(name, 0) + 1
            texts = [t for _, t in rows]
        else:
            texts = self.rng.sample(self.texts, self.batch)
        enc = self.tok(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            if groups:
                with AdapterSetup(BatchSplit(*groups, batch_sizes=list(groups.values()))):
                    hidden = self.model(**enc).last_hidden_state
                self._pool(hidden, enc["attention_mask"])
            else:
                self._bare(enc)
        return len(groups)

    def _bare(self, enc: Any) -> None:
        from server.execution.engine import length_buckets

        lengths = enc["attention_mask"].sum(1).tolist()
        for rows in length_buckets(lengths, self.buckets):
            idx = torch.tensor(rows)
            width = max(lengths[i] for i in rows)  # right padding: the bucket's columns are a prefix
            part = {k: v[idx, :width] for k, v in enc.items()}
            self._pool(self.model(**part).last_hidden_state, part["attention_mask"])

    @staticmethod
    def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> None:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).tolist()

    def run(self, seconds: float, tally: Tally) -> None:
        start = time.perf_counter()
        done = 0
        while time.perf_counter() - start < seconds:
            tally.distinct += self.one_batch()
            tally.rows += self.batch
            tally.batches += 1
            done += self.batch
        tally.add(done, time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str


def start_server(model_path: str, store: Path, max_batch_size: int, log: Path, threads: int, length_buckets: int = 2,
                 extra_args: Sequence[str] = (), ready_timeout_s: float = 180.0) -> Server:
    """`adapterserve serve` on a free port of 127.0.0.1; `extra_args` are this server's own flags (after
    EXTRA_SERVER_ARGS, which every server gets)."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--store", str(store),
           "--model", model_path, "--device", "cpu", "--max-batch-size", str(max_batch_size), "--log-level", "warning",
           "--torch-threads", str(threads), "--length-buckets", str(length_buckets), *EXTRA_SERVER_ARGS, *extra_args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log, ready_timeout_s)
    return Server(proc, url)


def stop_server(server: Server) -> int:
    server.proc.send_signal(signal.SIGTERM)
    return server.proc.wait(timeout=120)


def upload_all(url: str, adapters: list[tuple[str, Path, str]]) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
        for name, folder, _ in adapters:
            files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]
            r = c.post("/v1/adapters", data={"name": name}, files=files)
            if r.status_code != 201:
                raise SystemExit(f"upload of {name} failed: {r.status_code} {r.text}")


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k ** s) for k in range(1, n + 1)]


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class Load:
    """Closed-loop load on one server: `clients` keep-alive connections (bench.http_client, so that the load
    generator takes little CPU from the server's cores), each sending its next request when the last answer
    arrives. Every 200 answer is parsed and must hold one result per input. `names` in popularity order (the
    first is the most popular) with shuffle=False; by default they are shuffled first."""

    def __init__(self, server: Server, names: list[str], texts: list[str], args: argparse.Namespace, seed: int = 2,
                 shuffle: bool = True) -> None:
        self.server, self.texts, self.args = server, texts, args
        self.order = names[:]
        if shuffle:
            random.Random(seed).shuffle(self.order)  # popularity does not follow the config cycle
        self.weights = zipf_weights(len(self.order), args.zipf)
        self.rng = random.Random(seed * 1000)
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        self.pool = [KeepAliveClient(host, int(port)) for _ in range(args.clients)]

    async def _scrape(self) -> tuple[float, float, float, float]:
        text = (await self.pool[0].get("/metrics"))[1].decode()
        return (metric(text, "adapterserve_batch_distinct_adapters_sum"), metric(text, "adapterserve_batch_distinct_adapters_count"),
                metric(text, "adapterserve_batch_size_sum"), metric(text, "adapterserve_batch_size_count"))

    async def warm_up(self) -> None:
        """Every adapter once (the server loads it) over every connection; not measured."""
        n = len(self.pool)
        for i in range(0, len(self.order), n):
            answers = await asyncio.gather(*(c.post_json("/v1/infer", {"inputs": self.texts[:1], "adapters": name})
                                             for c, name in zip(self.pool, self.order[i:i + n], strict=False)))
            bad = [a for a in answers if a[0] != 200]
            if bad:
                raise SystemExit(f"warm-up request failed: {bad[0][0]} {bad[0][1][:300]!r}")

    async def run(self, seconds: float, tally: Tally) -> None:
        """Load for `seconds`; only answers that arrive inside the window count (requests still in flight at
        its end finish, uncounted, before the next case starts)."""
        per_request = self.args.inputs_per_request
        d0, c0, b0, n0 = await self._scrape()
        start = time.perf_counter()
        end = start + seconds
        done = 0

        async def one(client: KeepAliveClient, rng: random.Random) -> None:
            nonlocal done
            while time.perf_counter() < end:
                name = rng.choices(self.order, self.weights)[0]
                inputs = rng.sample(self.texts, per_request)
                t = time.perf_counter()
                try:
                    status, body = await client.post_json("/v1/infer", {"inputs": inputs, "adapters": name})
                except HTTPError as exc:
                    tally.errors += 1
                    tally.failures[f"no answer: {exc}"[:160]] += 1
                    continue
                now = time.perf_counter()
                if status != 200:
                    tally.errors += 1
                    tally.failures[f"{status}: {body[:120].decode(errors='replace')}"] += 1
                elif len(json.loads(body)["results"]) != per_request:
                    tally.errors += 1
                    tally.failures["200 with a wrong number of results"] += 1
                elif now <= end:
                    tally.latencies.append(now - t)
                    done += per_request

        await asyncio.gather(*(one(c, random.Random(self.rng.random())) for c in self.pool))
        tally.add(done, seconds)
        d1, c1, b1, n1 = await self._scrape()
        tally.distinct += d1 - d0
        tally.batches += c1 - c0
        tally.rows += b1 - b0

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.pool))


def run_async(coro: Any) -> Any:
    """uvloop when installed (as the server uses), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per case, over all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="slices per case; cases are interleaved round by round")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    parser.add_argument("--inputs-per-request", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32, help="the batched server's (and the in-process) batch size")
    parser.add_argument("--model", default=default_model_path())
    parser.add_argument("--server-arg", action="append", default=[], help="extra `adapterserve serve` flag (repeatable)")
    parser.add_argument("--length-buckets", type=int, default=2, help="the batched server's ADAPTERSERVE_LENGTH_BUCKETS "
                        "(and the in-process case cut like it)")
    parser.add_argument("--torch-threads", type=int, default=0, help="intra-op threads, same in-process and in the servers (0: torch default)")
    args = parser.parse_args()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    EXTRA_SERVER_ARGS.extend(args.server_arg)
    texts = sentences(512)
    slice_s = args.duration / args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"making {args.adapters} adapters ({', '.join(CONFIGS)}) on {args.model} ...", file=sys.stderr)
        adapters = make_adapters(args.model, work / "adapters", args.adapters)
        names = [a[0] for a in adapters]
        bare = InProcess(args.model, texts, args.max_batch_size, None, args.zipf)
        bare_buckets = InProcess(args.model, texts, args.max_batch_size, None, args.zipf, buckets=args.length_buckets)
        mixed = InProcess(args.model, texts, args.max_batch_size, adapters, args.zipf)
        local = {"bare": bare, "bare_buckets": bare_buckets, "mixed": mixed}
        for case in local.values():
            case.one_batch()
            case.one_batch()
        servers = {}
        try:
            for label, size in (("batched", args.max_batch_size), ("naive", 1)):
                print(f"starting the {label} server (max batch size {size}) and uploading ...", file=sys.stderr)
                servers[label] = start_server(args.model, work / f"store-{label}", size, work / f"server-{label}.log",
                                              args.torch_threads, args.length_buckets)
                upload_all(servers[label].url, adapters)
            tallies = {k: Tally() for k in ("bare", "bare_buckets", "mixed", "batched", "naive")}

            async def measure() -> None:
                loads = {k: Load(srv, names, texts, args) for k, srv in servers.items()}
                for load in loads.values():
                    await load.warm_up()
                order = list(tallies)
                rng = random.Random(0)
                for r in range(args.rounds):
                    rng.shuffle(order)  # a fresh order each round, so drift favours no case
                    print(f"round {r + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr)
                    for key in order:
                        if key in loads:
                            await loads[key].run(slice_s, tallies[key])
                        else:
                            local[key].run(slice_s, tallies[key])
                for load in loads.values():
                    await load.close()

            run_async(measure())
        finally:
            codes = {label: stop_server(srv) for label, srv in servers.items()}
        for label, code in codes.items():
            if code != 0:
                print(f"warning: the {label} server exited with {code}", file=sys.stderr)
    report(args, tallies)


def report(args: argparse.Namespace, t: dict[str, Tally]) -> None:
    base, cut = t["bare"].rate, t["bare_buckets"].rate
    print(f"\n{args.adapters} adapters (seq_bn/lora/prefix_tuning), {args.clients} clients, Zipf s={args.zipf}, "
          f"{args.inputs_per_request} input(s)/request, {args.duration:g}s per case in {args.rounds} interleaved slices, "
          f"MiniLM-L6, CPU x{os.cpu_count()}, torch threads {torch.get_num_threads()}\n")
    print("| case | inputs/s | slices inputs/s (min-max) | p50 ms | p99 ms | errors | mean rows/batch | "
          "mean distinct adapters/batch | vs bare backbone | vs bare cut by length | vs naive |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    labels = {
        "bare": f"bare backbone in-process (batch {args.max_batch_size}, no HTTP, no adapters)",
        "bare_buckets": f"bare backbone in-process, cut by length like the server (up to {args.length_buckets} passes per batch)",
        "mixed": f"same {args.adapters} adapters in-process (BatchSplit, batch {args.max_batch_size}, no HTTP)",
        "batched": f"server, batched (max batch {args.max_batch_size})",
        "naive": "server, naive (max batch 1)",
    }
    for key, label in labels.items():
        r = t[key]
        lat = sorted(r.latencies)
        p50 = f"{1000 * statistics.median(lat):.1f}" if lat else ""
        p99 = f"{1000 * percentile(lat, 0.99):.1f}" if lat else ""
        spread = f"{min(r.slice_rates):.1f}-{max(r.slice_rates):.1f}"
        errors = str(r.errors) if key in ("batched", "naive") else ""
        rows = f"{r.rows / r.batches:.1f}" if r.batches else ""
        distinct = f"{r.distinct / r.batches:.1f}" if r.batches else "0"
        vs_naive = f"{r.rate / t['naive'].rate:.2f}" if key in ("batched", "naive") else ""
        print(f"| {label} | {r.rate:.1f} | {spread} | {p50} | {p99} | {errors} | {rows} | {distinct} | "
              f"{r.rate / base:.2f} | {r.rate / cut:.2f} | {vs_naive} |")


if __name__ == "__main__":
    main()
