"""Load test of the real server: N adapters (seq_bn, LoRA, prefix tuning) on MiniLM, C concurrent clients
with Zipf adapter popularity, against the bare backbone in-process and the server with batching off.

    .venv/bin/python bench/serve_load.py [--adapters 100] [--clients 64] [--duration 20]

Prints a markdown table: throughput (inputs/s), p50/p99 latency, mean distinct adapters per forward pass,
and the ratios to the in-process bare backbone and to the naive (max batch size 1) server.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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


def bare_backbone_throughput(model_path: str, texts: list[str], batch: int, duration: float) -> float:
    """Inputs/s of the bare transformers backbone in this process: tokenize, forward, mean-pool, batches of `batch`."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    rng = random.Random(1)
    done = 0
    with torch.inference_mode():
        for _ in range(2):  # warm up
            enc = tok(rng.sample(texts, batch), padding=True, return_tensors="pt")
            model(**enc)
        start = time.perf_counter()
        while time.perf_counter() - start < duration:
            enc = tok(rng.sample(texts, batch), padding=True, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            pooled.tolist()
            done += batch
        return done / (time.perf_counter() - start)


def adapters_in_process_throughput(model_path: str, adapters: list[tuple[str, Path, str]], texts: list[str], batch: int,
                                   duration: float, zipf_s: float) -> tuple[float, float]:
    """Inputs/s of the same mixed-adapter work without HTTP: batches of `batch` rows, each row's adapter drawn
    from the Zipf popularity, rows sorted by adapter, one BatchSplit forward, mean-pooled. Also returns the
    mean distinct adapters per batch. The gap between this and the bare backbone is the adapters' cost."""
    from transformers import AutoTokenizer

    from adapters_core import AdapterSetup, AutoAdapterModel, BatchSplit

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoAdapterModel.from_pretrained(model_path).eval()
    names = [model.load_adapter(str(folder), load_as=name) for name, folder, _ in adapters]
    order = names[:]
    random.Random(2).shuffle(order)
    weights = zipf_weights(len(order), zipf_s)
    rng = random.Random(3)
    done, distinct, batches = 0, 0, 0
    with torch.inference_mode():
        start = 0.0
        for step in range(10**9):
            if step == 2:
                start = time.perf_counter()  # two warm-up batches
            if step > 2 and time.perf_counter() - start >= duration:
                break
            rows = sorted(zip(rng.choices(order, weights, k=batch), rng.sample(texts, batch), strict=True))
            groups: dict[str, int] = {}
            for name, _ in rows:
                groups[name] = groups.get(name, 0) + 1
            enc = tok([t for _, t in rows], padding=True, return_tensors="pt")
            with AdapterSetup(BatchSplit(*groups, batch_sizes=list(groups.values()))):
                hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).tolist()
            if step >= 2:
                done += batch
                distinct += len(groups)
                batches += 1
        return done / (time.perf_counter() - start), distinct / max(batches, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str


def start_server(model_path: str, store: Path, max_batch_size: int, log: Path, threads: int) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--store", str(store),
           "--model", model_path, "--device", "cpu", "--max-batch-size", str(max_batch_size), "--log-level", "warning",
           "--torch-threads", str(threads), *EXTRA_SERVER_ARGS]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return Server(proc, url)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not start:\n" + log.read_text())
        time.sleep(0.2)


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


@dataclass
class LoadResult:
    inputs_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_distinct: float
    mean_batch: float


async def drive(url: str, names: list[str], texts: list[str], clients: int, duration: float, zipf_s: float,
                inputs_per_request: int, seed: int = 2) -> LoadResult:
    """`clients` concurrent keep-alive connections (bench.http_client, so that load-generator CPU taken from
    the server's cores stays small); every 200 answer is parsed and must hold one result per input."""
    weights = zipf_weights(len(names), zipf_s)
    rng = random.Random(seed)
    order = names[:]
    rng.shuffle(order)  # popularity does not follow the config cycle
    latencies: list[float] = []
    errors = 0
    done_inputs = 0
    host, port = url.removeprefix("http://").rsplit(":", 1)
    pool = [KeepAliveClient(host, int(port)) for _ in range(clients)]
    try:
        async def scrape() -> tuple[float, float, float, float]:
            text = (await pool[0].get("/metrics"))[1].decode()
            return (metric(text, "adapterserve_batch_distinct_adapters_sum"), metric(text, "adapterserve_batch_distinct_adapters_count"),
                    metric(text, "adapterserve_batch_size_sum"), metric(text, "adapterserve_batch_size_count"))

        # warm-up: every adapter once (loads it) and every connection opened; not measured
        for i in range(0, len(order), clients):
            answers = await asyncio.gather(*(c.post_json("/v1/infer", {"inputs": texts[:1], "adapters": n})
                                             for c, n in zip(pool, order[i:i + clients], strict=False)))
            bad = [a for a in answers if a[0] != 200]
            if bad:
                raise SystemExit(f"warm-up request failed: {bad[0][0]} {bad[0][1][:300]!r}")
        await asyncio.gather(*(c.get("/healthz") for c in pool))
        d0, c0, b0, n0 = await scrape()
        end = time.perf_counter() + duration

        async def one(worker: int, client: KeepAliveClient) -> None:
            nonlocal errors, done_inputs
            local = random.Random(seed * 1000 + worker)
            while time.perf_counter() < end:
                name = local.choices(order, weights)[0]
                inputs = local.sample(texts, inputs_per_request)
                t = time.perf_counter()
                try:
                    status, body = await client.post_json("/v1/infer", {"inputs": inputs, "adapters": name})
                except HTTPError:
                    errors += 1
                    continue
                if status == 200 and len(json.loads(body)["results"]) == inputs_per_request:
                    latencies.append(time.perf_counter() - t)
                    done_inputs += inputs_per_request
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(w, c) for w, c in enumerate(pool)))
        elapsed = time.perf_counter() - start
        d1, c1, b1, n1 = await scrape()
    finally:
        await asyncio.gather(*(c.close() for c in pool))
    latencies.sort()
    return LoadResult(
        inputs_per_s=done_inputs / elapsed,
        p50_ms=1000 * statistics.median(latencies) if latencies else float("nan"),
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
        errors=errors,
        mean_distinct=(d1 - d0) / max(c1 - c0, 1),
        mean_batch=(b1 - b0) / max(n1 - n0, 1),
    )


def run_async(coro: Any) -> Any:
    """uvloop when installed (as the server uses), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_server_case(model_path: str, adapters: list[tuple[str, Path, str]], texts: list[str], max_batch: int,
                    args: argparse.Namespace, work: Path) -> LoadResult:
    store = work / f"store-{max_batch}"
    server = start_server(model_path, store, max_batch, work / f"server-{max_batch}.log", args.torch_threads)
    try:
        upload_all(server.url, adapters)
        result = run_async(drive(server.url, [a[0] for a in adapters], texts, args.clients, args.duration, args.zipf,
                                   args.inputs_per_request))
    finally:
        code = stop_server(server)
    if code != 0:
        print(f"warning: server exited with {code}", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per case")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    parser.add_argument("--inputs-per-request", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32, help="the batched server's (and the bare baseline's) batch size")
    parser.add_argument("--model", default=default_model_path())
    parser.add_argument("--server-arg", action="append", default=[], help="extra `adapterserve serve` flag (repeatable)")
    parser.add_argument("--torch-threads", type=int, default=0, help="intra-op threads, same for bare and server (0: torch default)")
    args = parser.parse_args()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    EXTRA_SERVER_ARGS.extend(args.server_arg)
    texts = sentences(512)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"making {args.adapters} adapters ({', '.join(CONFIGS)}) on {args.model} ...", file=sys.stderr)
        adapters = make_adapters(args.model, work / "adapters", args.adapters)
        print("bare backbone in-process ...", file=sys.stderr)
        bare_before = bare_backbone_throughput(args.model, texts, args.max_batch_size, args.duration)
        print("same adapters in-process (no HTTP) ...", file=sys.stderr)
        mixed, mixed_distinct = adapters_in_process_throughput(args.model, adapters, texts, args.max_batch_size,
                                                               args.duration, args.zipf)
        print("server, batched ...", file=sys.stderr)
        batched = run_server_case(args.model, adapters, texts, args.max_batch_size, args, work)
        print("server, batching off (max batch size 1) ...", file=sys.stderr)
        naive = run_server_case(args.model, adapters, texts, 1, args, work)
        print("bare backbone in-process again ...", file=sys.stderr)
        bare_after = bare_backbone_throughput(args.model, texts, args.max_batch_size, args.duration)
    bare = (bare_before + bare_after) / 2  # measured before and after the server runs: drift shows up here
    cpu = os.cpu_count()
    print(f"\n{args.adapters} adapters (seq_bn/lora/prefix_tuning), {args.clients} clients, Zipf s={args.zipf}, "
          f"{args.inputs_per_request} input(s)/request, {args.duration:g}s per case, MiniLM-L6, CPU x{cpu}, torch threads {torch.get_num_threads()}\n")
    print("| case | inputs/s | p50 ms | p99 ms | errors | mean rows/forward | mean distinct adapters/forward | vs bare backbone | vs naive |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| bare backbone in-process (batch {args.max_batch_size}, no HTTP, no adapters; mean of "
          f"{bare_before:.1f} before and {bare_after:.1f} after) | {bare:.1f} | | | | {args.max_batch_size} | 0 | 1.00 | |")
    print(f"| same {args.adapters} adapters in-process (BatchSplit, batch {args.max_batch_size}, no HTTP) | {mixed:.1f} | | | | "
          f"{args.max_batch_size} | {mixed_distinct:.1f} | {mixed / bare:.2f} | |")
    for label, r in ((f"server, batched (max batch {args.max_batch_size})", batched), ("server, naive (max batch 1)", naive)):
        print(f"| {label} | {r.inputs_per_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors} | {r.mean_batch:.1f} | "
              f"{r.mean_distinct:.1f} | {r.inputs_per_s / bare:.2f} | {r.inputs_per_s / naive.inputs_per_s:.2f} |")


if __name__ == "__main__":
    main()
