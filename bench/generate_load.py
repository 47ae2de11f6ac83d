"""Generation load on the real server: SmolLM2-135M, 32 adapters, streaming chat clients, against HF `generate`.

    .venv/bin/python bench/generate_load.py [--adapters 32] [--clients 32] [--tokens 64] [--duration 60] [--rounds 4]

Two real servers (`python -m server.cli serve --model smollm2` on 127.0.0.1, default settings but
--torch-threads): the normal one, and one limited to a single running sequence (--max-running-sequences 1,
with a wait deadline that outlasts a slice). Both get the same adapters made with adapters_core on the
SmolLM2 backbone (LoRA, seq_bn, prefix tuning and IA3 in turn, noisy non-zero weights), uploaded through
POST /v1/adapters. Five cases, each streaming POST /v1/chat/completions (greedy, `ignore_eos`, so every
request makes exactly max_tokens tokens; usage included):

  (a) `clients` closed-loop clients, client i on adapter i and chat prompt i, `tokens` new tokens each;
  (b) the same on the bare backbone (`model` = its served name, first in /v1/models);
  (c) in-process HF `generate` of the bare model (transformers' LlamaForCausalLM from the same folder, float32,
      --hf-threads torch threads), one static batch of the same chat prompts, left padded, greedy, `tokens` new;
  (d) the single-sequence server, the same clients as (a);
  (e) open loop: Poisson arrivals at --open-load (0.8) x (a)'s request rate (its tokens/s over `tokens`, measured
      in an unrecorded calibration slice of (a) before the rounds), max_tokens uniform in 8..128, random
      adapters and prompts, one connection per request in flight.

Every case gets `--rounds` slices of duration/rounds seconds, interleaved in a fresh random order each round,
so drift of a shared machine hits all alike; only one server is under load at a time (the other idles) and
each slice starts on an idle server (in-flight requests are cancelled by closing their connections at the
slice's end, then the server is polled until nothing runs or waits). A slice's new tokens are those that
reached the client inside it: a request that finished in it counts its usage.completion_tokens, one cut off
at the end its content events so far. TTFT is from sending the request to its first content event; a request
with no token yet at the slice's end only says its TTFT exceeds its wait, so the TTFT percentiles are
Kaplan-Meier estimates over both (">=" when one lies beyond every first token seen). Inter-token latency is the gap between consecutive content events of one stream (a token that
decodes to no text, a special token past EOS under ignore_eos, merges into the next gap); for (c) the gap
between generate's steps. Errors (connection failures, non-200 answers, `error` events, streams without
[DONE], finish_reason other than length, fewer tokens than asked) are counted per case and listed.

Prints a markdown table (new tokens/s, its range over slices, TTFT and inter-token p50/p99, requests
completed, errors), the ratios (a)/(c), (a)/(b), (a)/(d) with their per-round ranges, and per case the
server's own figures (its inter-token histogram's mean, tokens it counted) and CPU ms per new token of the
server process, its inference worker and this process (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import wait_ready  # noqa: E402
from bench.gen_stats import Stream, Tally, censored_percentile, percentile, poisson_arrivals  # noqa: E402
from bench.http_client import HTTPError, KeepAliveClient  # noqa: E402
from bench.serve_cpu import thread_cpu  # noqa: E402
from bench.serve_load import free_port, run_async, stop_server, upload_all  # noqa: E402
from server.settings import resolve_model_path  # noqa: E402

CONFIGS = ("lora", "seq_bn", "prefix_tuning", "ia3")
CASES = ("a", "b", "c", "d", "e")
TOPICS = (
    "the water cycle", "how a bicycle works", "the history of the printing press", "photosynthesis", "black holes",
    "how vaccines work", "the French revolution", "volcanoes", "how the internet routes packets", "bees and honey",
    "the moon landing", "how bread rises", "ocean tides", "electric cars", "the Roman empire", "how rainbows form",
)
ASKS = ("Explain {} to a curious child, step by step.", "Write a short story that involves {}.",
        "Give me five interesting facts about {}, with a sentence on each.", "Write a detailed essay about {}.")


def chat_prompts(n: int) -> list[str]:
    """n distinct requests that invite long answers (fixed)."""
    return [ASKS[(i // len(TOPICS)) % len(ASKS)].format(TOPICS[i % len(TOPICS)]) + ("" if i < 64 else f" ({i})")
            for i in range(n)]


def make_adapters(model_path: str, out: Path, n: int, sigma: float) -> list[tuple[str, Path, str]]:
    """n adapters made with adapters_core on the causal LM, cycling through CONFIGS, with noisy weights."""
    from transformers import AutoModelForCausalLM

    import adapters_core

    model = adapters_core.init(AutoModelForCausalLM.from_pretrained(model_path).eval())
    made = []
    for i in range(n):
        config = CONFIGS[i % len(CONFIGS)]
        name = f"gen{i:03d}"
        model.add_adapter(name, config=config)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.adapter_parameters(name):
                p.add_(torch.randn(p.shape, generator=gen) * sigma)
        model.save_adapter(str(out / name), name)
        model.delete_adapter(name)
        made.append((name, out / name, config))
    return made


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# -- servers --------------------------------------------------------------------------------------------------
@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    host: str
    port: int
    log: Path


def start_server(model: str, store: Path, log: Path, threads: int, extra: list[str]) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--store", str(store),
           "--model", model, "--log-level", "warning", "--torch-threads", str(threads), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log)
    return Server(proc, url, "127.0.0.1", port, log)


async def scrape(server: Server) -> dict[str, float]:
    client = KeepAliveClient(server.host, server.port, timeout=30)
    try:
        status, body = await client.get("/metrics")
    finally:
        await client.close()
    if status != 200:
        raise SystemExit(f"GET /metrics: {status}")
    text = body.decode()
    names = ("adapterserve_generation_running_sequences", "adapterserve_generation_waiting_sequences",
             "adapterserve_generated_tokens_total", "adapterserve_generation_inter_token_seconds_sum",
             "adapterserve_generation_inter_token_seconds_count")
    return {n: metric(text, n) for n in names}


async def wait_idle(server: Server, timeout_s: float = 120.0) -> None:
    """Until the server runs and queues no sequence (the cancelled streams of the last slice have left)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = await scrape(server)
        if m["adapterserve_generation_running_sequences"] == 0 and m["adapterserve_generation_waiting_sequences"] == 0:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"server {server.url} still busy after {timeout_s:.0f}s: {m}")
        await asyncio.sleep(0.1)


def body_for(model: str, prompt: str, max_tokens: int) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()


async def one_request(client: KeepAliveClient, body: bytes, s: Stream, timeout: float) -> None:
    """Send one streaming request and fill `s`; failures end up in s.error, never raised."""
    try:
        status, data = await client.post_stream("/v1/chat/completions", body, s.feed, timeout=timeout)
    except HTTPError as exc:
        s.error = f"connection: {str(exc).split(': ', 1)[-1].split(':')[0]}"
        return
    if status != 200:
        try:
            slug = json.loads(data).get("type", "").rsplit("/", 1)[-1]
        except ValueError:
            slug = ""
        s.error = f"HTTP {status}{' ' + slug if slug else ''}"


class ServerCase:
    """Closed- or open-loop streaming load on one server for one slice at a time."""

    def __init__(self, server: Server, models: list[str], prompts: list[str], args: argparse.Namespace,
                 open_loop: bool = False) -> None:
        self.server, self.models, self.prompts, self.args, self.open_loop = server, models, prompts, args, open_loop
        self.rate = 0.0  # open loop: arrivals per second
        self.rng = random.Random(11)
        self.bodies = [body_for(models[i % len(models)], prompts[i % len(prompts)], args.tokens) for i in range(args.clients)]

    async def run(self, seconds: float, tally: Tally) -> None:
        await wait_idle(self.server)
        m0, c0, r0 = await scrape(self.server), thread_cpu(self.server.proc.pid), resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        end = start + seconds
        streams: list[Stream] = []
        clients: list[KeepAliveClient] = []
        timeout = seconds + 60

        def client() -> KeepAliveClient:
            c = KeepAliveClient(self.server.host, self.server.port)
            clients.append(c)
            return c

        async def closed(i: int) -> None:
            c = client()
            while time.perf_counter() < end:
                s = Stream(time.perf_counter(), self.args.tokens, end)
                streams.append(s)
                await one_request(c, self.bodies[i], s, timeout)

        inflight: set[asyncio.Future[None]] = set()

        async def open_arrival(c: KeepAliveClient, body: bytes, max_tokens: int, idle: list[KeepAliveClient]) -> None:
            s = Stream(time.perf_counter(), max_tokens, end)
            streams.append(s)
            await one_request(c, body, s, timeout)
            idle.append(c)  # its connection is free again (not after a cancel: that one is closed)

        async def arrivals() -> None:
            idle: list[KeepAliveClient] = []
            for offset in poisson_arrivals(self.rate, seconds, self.rng):
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                i = self.rng.randrange(len(self.models))
                max_tokens = self.rng.randint(self.args.open_min_tokens, self.args.open_max_tokens)
                body = body_for(self.models[i], self.prompts[self.rng.randrange(len(self.prompts))], max_tokens)
                task = asyncio.ensure_future(open_arrival(idle.pop() if idle else client(), body, max_tokens, idle))
                task.add_done_callback(inflight.discard)
                inflight.add(task)
                tally.offered += 1

        if self.open_loop:
            inflight.add(asyncio.ensure_future(arrivals()))
        else:
            inflight.update(asyncio.ensure_future(closed(i)) for i in range(self.args.clients))
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        # the slice is over: cut every stream (closing its connection cancels its sequence on the server)
        cut = list(inflight)
        for t in cut:
            t.cancel()
        await asyncio.gather(*cut, return_exceptions=True)
        for c in clients:
            c.abort()
        c1, r1 = thread_cpu(self.server.proc.pid), resource.getrusage(resource.RUSAGE_SELF)
        await wait_idle(self.server)
        m1 = await scrape(self.server)
        tally.add_slice(tally.add_streams(streams, end), seconds)
        tally.server_tokens += m1["adapterserve_generated_tokens_total"] - m0["adapterserve_generated_tokens_total"]
        tally.server_itl_sum += (m1["adapterserve_generation_inter_token_seconds_sum"]
                                 - m0["adapterserve_generation_inter_token_seconds_sum"])
        tally.server_itl_count += (m1["adapterserve_generation_inter_token_seconds_count"]
                                   - m0["adapterserve_generation_inter_token_seconds_count"])
        main = str(self.server.proc.pid)
        for tid, cpu in c1.items():
            tally.cpu["server" if tid.split("/")[0] == main else "worker"] += cpu - c0.get(tid, 0.0)
        tally.cpu["client"] += (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


class StepTimes:
    """A generate() streamer that only notes when each step's tokens arrive (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFStatic:
    """(c): transformers' LlamaForCausalLM, one static left-padded batch of the chat prompts, greedy."""

    def __init__(self, model_path: str, prompt_ids: list[list[int]], tokens: int, pad_id: int) -> None:
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.tokens, self.pad_id = tokens, pad_id
        width = max(len(p) for p in prompt_ids)
        self.ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids])
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])

    def generate(self, tokens: int) -> StepTimes:
        steps = StepTimes()
        # min_new_tokens = max_new_tokens: every row makes exactly `tokens` tokens, as ignore_eos does on the server
        with torch.inference_mode():
            out = self.model.generate(self.ids, attention_mask=self.mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                      do_sample=False, pad_token_id=self.pad_id, streamer=steps)
        if out.shape[1] - self.ids.shape[1] != tokens:
            raise SystemExit(f"HF generate made {out.shape[1] - self.ids.shape[1]} tokens, not {tokens}")
        return steps

    def run(self, seconds: float, tally: Tally) -> None:
        """Whole generate() calls until `seconds` have passed (at least one); the slice is as long as they took."""
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        calls = 0
        while calls == 0 or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            steps = self.generate(self.tokens)
            times = steps.times[1:]  # after the prompt: one per new token
            rows = self.ids.shape[0]
            tally.ttft.extend([(times[0] - t0, False)] * rows)
            tally.gaps.extend(b - a for a, b in zip(times, times[1:], strict=False))
            tally.completed += rows
            calls += 1
        elapsed = time.perf_counter() - start
        tally.add_slice(calls * self.ids.shape[0] * self.tokens, elapsed)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        tally.cpu["client"] += (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


async def warm_up(server: Server, models: list[str], prompts: list[str], tokens: int) -> list[str]:
    """Every model (adapter or backbone) once, concurrently (the server loads each adapter); returns the greedy
    texts of the first prompt, to check that the adapters change the answer."""
    texts: list[str] = []

    async def one(model: str) -> str:
        client = KeepAliveClient(server.host, server.port, timeout=600)
        try:
            payload = {"model": model, "messages": [{"role": "user", "content": prompts[0]}], "max_tokens": tokens,
                       "temperature": 0, "ignore_eos": True}
            status, body = await client.post_json("/v1/chat/completions", payload)
        finally:
            await client.close()
        if status != 200:
            raise SystemExit(f"warm-up of {model} failed: {status} {body[:300]!r}")
        return str(json.loads(body)["choices"][0]["message"]["content"])

    gate = asyncio.Semaphore(4)  # a few at a time: 33 loads and prefills at once can outwait the server's deadline

    async def gated(model: str) -> str:
        async with gate:
            return await one(model)

    texts = list(await asyncio.gather(*(gated(m) for m in models)))
    return texts


def served_name(server: Server) -> str:
    import httpx

    return str(httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"])


# -- the run -------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients (and the HF batch: one chat prompt each)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request in (a)-(d)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per case, over all rounds")
    parser.add_argument("--rounds", type=int, default=4, help="slices per case; cases are interleaved round by round")
    parser.add_argument("--open-load", type=float, default=0.8, help="(e)'s arrival rate as a fraction of (a)'s requests/s")
    parser.add_argument("--open-min-tokens", type=int, default=8)
    parser.add_argument("--open-max-tokens", type=int, default=128)
    parser.add_argument("--model", default="smollm2", help="the backbone (a built-in name or a folder)")
    parser.add_argument("--server-threads", type=int, default=2, help="each server's --torch-threads")
    parser.add_argument("--hf-threads", type=int, default=2, help="torch threads of the in-process HF generate (c)")
    parser.add_argument("--sigma", type=float, default=0.02, help="std of the noise added to every adapter weight")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `adapterserve serve` flag for both servers (repeatable)")
    args = parser.parse_args()
    if min(args.adapters, args.clients, args.tokens, args.rounds) < 1 or args.open_min_tokens > args.open_max_tokens:
        raise SystemExit("--adapters, --clients, --tokens and --rounds must be at least 1; --open-min-tokens <= --open-max-tokens")
    torch.set_num_threads(args.hf_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_path = resolve_model_path(args.model)
    slice_s = args.duration / args.rounds
    prompts = chat_prompts(args.clients)
    t_start = time.perf_counter()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = [list(tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)["input_ids"]) for p in prompts]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"making {args.adapters} adapters ({', '.join(CONFIGS)}) on {model_path} ...", file=sys.stderr)
        adapters = make_adapters(model_path, work / "adapters", args.adapters, args.sigma)
        names = [a[0] for a in adapters]
        hf = HFStatic(model_path, prompt_ids, args.tokens, pad_id)
        servers: dict[str, Server] = {}
        try:
            # the naive server: one running sequence; its queue waits longer than a slice (30 s by default)
            for label, extra in (("main", []), ("single", ["--max-running-sequences", "1", "--request-timeout-s",
                                                             str(max(30.0, 2 * slice_s + 60))])):
                print(f"starting the {label} server ...", file=sys.stderr)
                servers[label] = start_server(args.model, work / f"store-{label}", work / f"server-{label}.log",
                                              args.server_threads, extra + args.server_arg)
                upload_all(servers[label].url, adapters)
            backbone = served_name(servers["main"])
            tallies = {k: Tally() for k in CASES}

            async def measure() -> tuple[float, float, int]:
                texts = await warm_up(servers["main"], [backbone, *names], prompts, 8)
                changed = sum(t != texts[0] for t in texts[1:])
                await warm_up(servers["single"], names, prompts, 2)
                hf.generate(2)
                cases = {
                    "a": ServerCase(servers["main"], names, prompts, args),
                    "b": ServerCase(servers["main"], [backbone], prompts, args),
                    "d": ServerCase(servers["single"], names, prompts, args),
                    "e": ServerCase(servers["main"], names, prompts, args, open_loop=True),
                }
                calibration = Tally()
                print(f"calibration: one unrecorded slice of (a), {slice_s:g}s ...", file=sys.stderr)
                await cases["a"].run(slice_s, calibration)
                request_rate = calibration.rate / args.tokens
                cases["e"].rate = args.open_load * request_rate
                order = list(CASES)
                rng = random.Random(0)
                for r in range(args.rounds):
                    rng.shuffle(order)  # a fresh order each round, so drift favours no case
                    print(f"round {r + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr)
                    for key in order:
                        if key == "c":
                            for srv in servers.values():
                                await wait_idle(srv)
                            hf.run(slice_s, tallies[key])
                        else:
                            await cases[key].run(slice_s, tallies[key])
                return request_rate, cases["e"].rate, changed

            request_rate, open_rate, changed = run_async(measure())
        finally:
            codes = {label: stop_server(srv) for label, srv in servers.items()}
        for label, srv in servers.items():  # the servers' own errors (log level warning), e.g. a failed step
            text = srv.log.read_text(errors="replace")
            problems = [line for line in text.splitlines() if " ERROR " in line or line.startswith(("ERROR", "Traceback"))]
            if problems:
                print(f"warning: the {label} server logged {len(problems)} error(s); the last: {problems[-1][:300]}",
                      file=sys.stderr)
        for label, code in codes.items():
            if code != 0:
                print(f"warning: the {label} server exited with {code}; its log:\n{servers[label].log.read_text()[-3000:]}",
                      file=sys.stderr)
    report(args, tallies, request_rate, open_rate, changed, prompt_ids, time.perf_counter() - t_start)


def report(args: argparse.Namespace, t: dict[str, Tally], request_rate: float, open_rate: float, changed: int,
           prompt_ids: list[list[int]], wall: float) -> None:
    lengths = [len(p) for p in prompt_ids]
    print(f"\nSmolLM2-135M, {args.adapters} adapters ({'/'.join(CONFIGS)}, noise sigma {args.sigma:g}), {args.clients} "
          f"clients, {args.tokens} new tokens, chat prompts of {min(lengths)}-{max(lengths)} tokens, "
          f"{args.duration:g}s per case in {args.rounds} interleaved slices, CPU x{os.cpu_count()}, server torch threads "
          f"{args.server_threads}, HF torch threads {args.hf_threads}; wall {wall:.0f}s\n")
    labels = {
        "a": f"(a) server, {args.clients} closed-loop clients, each on its own adapter",
        "b": f"(b) server, {args.clients} closed-loop clients, bare backbone",
        "c": f"(c) HF generate in-process, static batch of {args.clients}, bare",
        "d": f"(d) server with max 1 running sequence, {args.clients} clients on adapters",
        "e": f"(e) server, open loop: Poisson {open_rate:.2f} req/s ({args.open_load:g} x (a)'s {request_rate:.2f}), "
             f"max_tokens {args.open_min_tokens}-{args.open_max_tokens}, adapters",
    }
    print("| case | new tokens/s | slices tokens/s (min-max) | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms | "
          "inter-token p99 ms | requests completed | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, label in labels.items():
        r = t[key]
        spread = f"{min(r.slice_rates):.1f}-{max(r.slice_rates):.1f}" if r.slice_rates else ""
        itl50 = f"{1000 * percentile(r.gaps, 0.5):.1f}" if r.gaps else ""
        itl99 = f"{1000 * percentile(r.gaps, 0.99):.1f}" if r.gaps else ""
        print(f"| {label} | {r.rate:.1f} | {spread} | {censored_percentile(r.ttft, 0.5)} | {censored_percentile(r.ttft, 0.99)} | "
              f"{itl50} | {itl99} | {r.completed} | {sum(r.errors.values())} |")
    print()
    for num, den, target in (("a", "c", 0.90), ("a", "b", 0.92), ("a", "d", 6.0)):
        ratio = t[num].rate / t[den].rate if t[den].rate else float("nan")
        rounds = [x / y for x, y in zip(t[num].slice_rates, t[den].slice_rates, strict=False) if y]
        spread = f", per round {min(rounds):.2f}-{max(rounds):.2f}" if rounds else ""
        verdict = "met" if ratio >= target else "NOT met"
        print(f"- ({num})/({den}) = {ratio:.3f}{spread} (target >= {target:g}: {verdict})")
    print(f"- adapters whose 8-token greedy answer to prompt 0 differs from the backbone's: {changed}/{args.adapters}")
    if t["e"].seconds:
        print(f"- (e) sent {t['e'].offered} requests in {t['e'].seconds:.0f}s ({t['e'].offered / t['e'].seconds:.2f}/s offered)")
    errors = {k: r.errors for k, r in t.items() if r.errors}
    if errors:
        print("\nErrors by case:")
        for key, counts in errors.items():
            print(f"- ({key}): " + ", ".join(f"{why}: {n}" for why, n in counts.most_common()))
    print("\n| case | server-counted tokens/s | server mean inter-token ms | CPU ms per new token: server process | "
          "inference worker | this process |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for key in CASES:
        r = t[key]
        n = max(r.tokens, 1)
        if key == "c":
            print(f"| ({key}) | | | | | {1000 * r.cpu['client'] / n:.2f} |")
            continue
        itl = f"{1000 * r.server_itl_sum / r.server_itl_count:.1f}" if r.server_itl_count else ""
        rate = f"{r.server_tokens / r.seconds:.1f}" if r.seconds else ""
        print(f"| ({key}) | {rate} | {itl} | {1000 * r.cpu['server'] / n:.2f} | {1000 * r.cpu['worker'] / n:.2f} | "
              f"{1000 * r.cpu['client'] / n:.2f} |")
    censored = {k: sum(c for _, c in r.ttft) for k, r in t.items() if any(c for _, c in r.ttft)}
    if censored:
        print("\nTTFT percentiles are Kaplan-Meier estimates: requests with no token yet at their slice's end (" +
              ", ".join(f"({k}) {n}" for k, n in censored.items()) + ") count as waiting at least that long; '>=' marks a "
              "percentile beyond every first token seen.")


if __name__ == "__main__":
    main()
