"""Soak test of the real server: minutes of mixed traffic, with the server's memory sampled as it runs.

    .venv/bin/python bench/soak.py [--duration 600] [--adapters 100] [--clients 8]

One `adapterserve serve` process (MiniLM, CPU, its inference worker child) and a store of `--adapters`
adapters (seq_bn, LoRA, prefix tuning). For `--duration` seconds, closed-loop clients send embeddings and
/v1/infer requests over the adapters (Zipf popularity) while one churn loop uploads new versions, deletes
and re-uploads adapters (hot swaps under load) and sends hostile requests from the red-team list (wide
Parallel, deep Stack, lone surrogates, an oversized head config, non-finite weights, a bz2 tar bomb,
unfinished headers). Every 10 s the resident memory of the server and its worker is read from /proc.

Prints the count of 5xx answers (target 0), answers by status per kind of request, latency p50/p99 of the
traffic, and RSS at the start, after warm-up and at the end (target: end within 10% of after warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import bz2
import json
import random
import statistics
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import minilm_path, multipart_body  # noqa: E402
from bench.http_client import HTTPError, KeepAliveClient  # noqa: E402
from bench.serve_load import (  # noqa: E402
    Server,
    make_adapters,
    sentences,
    start_server,
    stop_server,
    upload_all,
    zipf_weights,
)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc (0 for a process that is gone)."""
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


@dataclass
class Tally:
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    five_xx: list[str] = field(default_factory=list)

    def record(self, kind: str, status: int, body: bytes) -> None:
        self.statuses.setdefault(kind, Counter())[status] += 1
        if status >= 500:
            self.five_xx.append(f"{kind} {status} {body[:200]!r}")


def _bz2_tar_bomb(claimed: int = 1 << 30) -> bytes:
    """A .tar whose bytes are really bz2: one member of `claimed` zero bytes, a few KB compressed."""
    comp = bz2.BZ2Compressor(9)
    out = bytearray()
    info = tarfile.TarInfo("adapter.safetensors")
    info.size = claimed
    out += comp.compress(info.tobuf())
    chunk = bytes(1 << 20)
    for _ in range(claimed >> 20):
        out += comp.compress(chunk)
    out += comp.flush()
    return bytes(out)


class Soak:
    def __init__(self, server: Server, adapters: list[tuple[str, Path, str]], args: argparse.Namespace) -> None:
        self.server, self.adapters, self.args = server, adapters, args
        self.host, port = server.url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.names = [name for name, _, _ in adapters]
        self.weights = zipf_weights(len(self.names), 1.1)
        self.texts = sentences(512)
        self.tally = Tally()
        self.deadline = 0.0
        self.bomb = _bz2_tar_bomb()

    async def traffic(self, seed: int) -> None:
        rng = random.Random(seed)
        client = KeepAliveClient(self.host, self.port, timeout=120)
        try:
            while time.monotonic() < self.deadline:
                name = rng.choices(self.names, self.weights)[0]
                texts = rng.sample(self.texts, rng.randint(1, 4))
                if rng.random() < 0.6:
                    kind, path, body = "embeddings", "/v1/embeddings", {"model": name, "input": texts}
                else:
                    kind, path, body = "infer", "/v1/infer", {"inputs": texts, "adapters": name}
                start = time.perf_counter()
                try:
                    status, data = await client.post_json(path, body)
                except HTTPError as exc:
                    self.tally.errors[f"{kind}: {exc}"[:120]] += 1
                    continue
                if status == 200:
                    self.tally.latencies.append(time.perf_counter() - start)
                self.tally.record(kind, status, data)
        finally:
            await client.close()

    async def churn(self) -> None:
        """Uploads of new versions, deletes and re-uploads, and hostile requests, one at a time."""
        rng = random.Random(99)
        client = KeepAliveClient(self.host, self.port, timeout=120)
        hostile = [self._wide_parallel, self._deep_stack, self._surrogate, self._huge_labels, self._nan_weights,
                   self._tar_bomb, self._unfinished_headers]
        step = 0
        try:
            while time.monotonic() < self.deadline:
                step += 1
                name, folder, _ = rng.choice(self.adapters)
                kind = ("hostile", "new-version", "re-upload")[step % 3]
                try:
                    if kind == "hostile":
                        probe = hostile[(step // 3) % len(hostile)]
                        kind = f"hostile {probe.__name__.strip('_').replace('_', ' ')}"
                        status, data = await probe(client)
                    elif kind == "new-version":
                        status, data = await self._upload(client, f"/v1/adapters/{name}/versions", {}, folder)
                    else:
                        status, data = await client.request("DELETE", f"/v1/adapters/{name}")
                        self.tally.record("delete", status, data)
                        status, data = await self._upload(client, "/v1/adapters", {"name": name}, folder)
                except HTTPError as exc:
                    self.tally.errors[f"{kind}: {exc}"[:120]] += 1
                    continue
                self.tally.record(kind, status, data)
                await asyncio.sleep(self.args.churn_pause)
        finally:
            await client.close()

    async def _upload(self, client: KeepAliveClient, path: str, fields: dict[str, str], folder: Path) -> tuple[int, bytes]:
        files = [("files", p.name, p.read_bytes()) for p in sorted(folder.iterdir())]
        body, ctype = multipart_body(fields, files)
        return await client.request("POST", path, body, ctype)

    async def _wide_parallel(self, client: KeepAliveClient) -> tuple[int, bytes]:
        return await client.post_json("/v1/infer", {"inputs": ["a " * 62] * 64, "adapters": {"parallel": [self.names[0]] * 50}})

    async def _deep_stack(self, client: KeepAliveClient) -> tuple[int, bytes]:
        return await client.post_json("/v1/infer", {"inputs": ["hello world"], "adapters": {"stack": [self.names[0]] * 998}})

    async def _surrogate(self, client: KeepAliveClient) -> tuple[int, bytes]:
        return await client.request("POST", "/v1/infer", b'{"inputs": ["a\\ud800b"], "adapters": "%s"}' % self.names[0].encode())

    async def _huge_labels(self, client: KeepAliveClient) -> tuple[int, bytes]:
        folder = self.adapters[0][1]
        files = [("files", p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if not p.name.startswith("head")]
        head = {"head_type": "classification", "num_labels": 100_000_000, "layers": 2, "activation_function": "tanh"}
        files.append(("files", "head_config.json", json.dumps({"config": head, "hidden_size": 384}).encode()))
        body, ctype = multipart_body({"name": "hostile-head"}, files)
        return await client.request("POST", "/v1/adapters", body, ctype)

    async def _nan_weights(self, client: KeepAliveClient) -> tuple[int, bytes]:
        import torch
        from safetensors.torch import load_file, save_file

        folder = self.adapters[0][1]
        tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(folder / "adapter.safetensors")).items()}
        with tempfile.TemporaryDirectory() as tmp:
            save_file(tensors, f"{tmp}/w.safetensors")
            weights = Path(f"{tmp}/w.safetensors").read_bytes()
        files = [("files", "adapter_config.json", (folder / "adapter_config.json").read_bytes()),
                 ("files", "adapter.safetensors", weights)]
        body, ctype = multipart_body({"name": "hostile-nan"}, files)
        return await client.request("POST", "/v1/adapters", body, ctype)

    async def _tar_bomb(self, client: KeepAliveClient) -> tuple[int, bytes]:
        body, ctype = multipart_body({"name": "hostile-bomb"}, [("archive", "bomb.tar", self.bomb)])
        return await client.request("POST", "/v1/adapters", body, ctype)

    async def _unfinished_headers(self, client: KeepAliveClient) -> tuple[int, bytes]:
        """A connection that sends half a request line and waits; the server must close it in bounded time."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        try:
            closed = await asyncio.wait_for(reader.read(), timeout=self.args.header_timeout_wait)
            status = int(closed.split(b" ", 2)[1]) if closed.startswith(b"HTTP/1.") else 499
        except TimeoutError:
            status = 0  # still open when we gave up: reported as status 0
        finally:
            writer.close()
        return status, b""

    async def sample_rss(self, samples: list[tuple[float, int]], start: float) -> None:
        while time.monotonic() < self.deadline:
            samples.append((time.monotonic() - start, rss_bytes(self.server.proc.pid)))
            await asyncio.sleep(10)
        samples.append((time.monotonic() - start, rss_bytes(self.server.proc.pid)))

    async def run(self) -> list[tuple[float, int]]:
        samples: list[tuple[float, int]] = []
        start = time.monotonic()
        self.deadline = start + self.args.duration
        await asyncio.gather(self.sample_rss(samples, start), self.churn(),
                             *(self.traffic(i) for i in range(self.args.clients)))
        return samples


def report(soak: Soak, samples: list[tuple[float, int]], warmup_s: float, args: argparse.Namespace) -> None:
    t = soak.tally
    print(f"\nsoak: {args.duration:.0f} s, {args.adapters} adapters, {args.clients} clients "
          f"(`python bench/soak.py --duration {args.duration:.0f} --adapters {args.adapters} --clients {args.clients}`)\n")
    print("| requests | answers by status |")
    print("| --- | --- |")
    for kind, counts in sorted(t.statuses.items()):
        print(f"| {kind} | {', '.join(f'{s}: {n}' for s, n in sorted(counts.items()))} |")
    lat = sorted(t.latencies)
    p50 = statistics.median(lat) * 1000 if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else float("nan")
    start_rss = samples[0][1]
    warm = next((r for s, r in samples if s >= warmup_s), samples[-1][1])
    end = samples[-1][1]
    print("\n| figure | value |")
    print("| --- | ---: |")
    print(f"| 5xx answers (target 0) | {len(t.five_xx)} |")
    print(f"| client errors (no HTTP answer) | {sum(t.errors.values())} |")
    print(f"| traffic answered 200 | {len(lat)} |")
    print(f"| latency p50 / p99 (ms, 200s) | {p50:.0f} / {p99:.0f} |")
    print(f"| RSS at start (MB) | {start_rss / 2**20:.0f} |")
    print(f"| RSS after {warmup_s:.0f} s warm-up (MB) | {warm / 2**20:.0f} |")
    print(f"| RSS at end (MB) | {end / 2**20:.0f} |")
    print(f"| end / after warm-up (target <= 1.10) | {end / warm:.3f} |")
    for line in t.five_xx[:10]:
        print("5xx:", line)
    for err, n in t.errors.most_common(5):
        print(f"error x{n}: {err}")
    print("\nRSS samples (s, MB):", ", ".join(f"{s:.0f}:{r / 2**20:.0f}" for s, r in samples))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--warmup", type=float, default=60, help="seconds after which the warm RSS is read")
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--churn-pause", type=float, default=0.5, help="seconds between churn steps")
    p.add_argument("--header-timeout-wait", type=float, default=30, help="how long an unfinished request waits to be closed")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    model = minilm_path()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = make_adapters(model, root / "adapters", args.adapters)
        server = start_server(model, root / "store", 32, root / "server.log", args.threads)
        try:
            upload_all(server.url, adapters)
            with httpx.Client(base_url=server.url, timeout=60) as c:
                assert c.get("/healthz").status_code == 200
            soak = Soak(server, adapters, args)
            samples = asyncio.run(soak.run())
        finally:
            rc = stop_server(server)
        report(soak, samples, args.warmup, args)
        print(f"server exit code: {rc}")
        log = (root / "server.log").read_text()
        if "Traceback" in log:
            print("server log has tracebacks:\n" + log[-4000:])


if __name__ == "__main__":
    main()
