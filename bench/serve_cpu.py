"""Where the server's CPU goes under load: CPU seconds per input of each server thread and of the client.

    .venv/bin/python bench/serve_cpu.py [--seconds 15] [--server-arg=--switch-interval-ms=5]

Starts one batched server (bench/serve_load.py's setup: 100 adapters, 64 clients, Zipf popularity), loads
it for a while and reads every server thread's utime+stime from /proc/<pid>/task/*/stat (Linux) before
and after. The busiest thread is the inference thread; the next is the event loop.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import serve_load as sl  # noqa: E402


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of every thread of `pid`, by thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        out[tid] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--server-arg", action="append", default=[], help="extra `adapterserve serve` flag (repeatable)")
    args = parser.parse_args()
    sl.EXTRA_SERVER_ARGS.extend(args.server_arg)
    model = sl.default_model_path()
    texts = sl.sentences(512)
    load_args = argparse.Namespace(zipf=1.1, clients=args.clients, inputs_per_request=1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapters = sl.make_adapters(model, work / "adapters", args.adapters)
        server = sl.start_server(model, work / "store", 32, work / "server.log", args.torch_threads)
        try:
            sl.upload_all(server.url, adapters)
            tally = sl.Tally()

            async def measure() -> tuple[dict[str, float], dict[str, float], float]:
                load = sl.Load(server, [a[0] for a in adapters], texts, load_args)
                await load.warm_up()
                before, r0 = thread_cpu(server.proc.pid), resource.getrusage(resource.RUSAGE_SELF)
                await load.run(args.seconds, tally)
                after, r1 = thread_cpu(server.proc.pid), resource.getrusage(resource.RUSAGE_SELF)
                await load.close()
                return before, after, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)

            before, after, client = sl.run_async(measure())
        finally:
            sl.stop_server(server)
    n = max(tally.inputs, 1)
    used = sorted(((after[t] - before.get(t, 0.0), t) for t in after), reverse=True)
    print(f"\n{tally.rate:.1f} inputs/s over {args.seconds:g}s; server flags: {' '.join(args.server_arg) or '(defaults)'}\n")
    print("| process / thread | CPU ms per input |")
    print("| --- | ---: |")
    for seconds, tid in used:
        if seconds > 0.05:
            print(f"| server thread {tid} | {1000 * seconds / n:.2f} |")
    print(f"| load generator (this process) | {1000 * client / n:.2f} |")


if __name__ == "__main__":
    main()
