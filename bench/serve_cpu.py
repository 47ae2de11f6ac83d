"""Where the server's CPU goes under load: CPU seconds per input of each server thread and of the client.

    .venv/bin/python bench/serve_cpu.py [--seconds 15] [--server-arg=--switch-interval-ms=5]

Starts one batched server (bench/serve_load.py's setup: 100 adapters, 64 clients, Zipf popularity), loads
it for a while and reads the utime+stime of every thread of the server and of its child processes (the
inference worker) from /proc/<pid>/task/*/stat (Linux) before and after. With the worker (the default)
the busiest thread is the worker's main thread; with --server-arg=--inference-worker=false it is the
server's inference thread. The next is the event loop.
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


def _stat_fields(path: str) -> list[str]:
    stat = Path(path).read_text()
    return stat[stat.rindex(")") + 2:].split()  # fields after the command name: state, ppid, ...


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(f"/proc/{entry}/stat")[1]) == pid:
                    kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of every thread of `pid` and of its children, by "pid/tid"."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for proc in (pid, *children(pid)):
        try:
            tids = os.listdir(f"/proc/{proc}/task")
        except OSError:
            continue  # the process ended meanwhile
        for tid in tids:
            try:
                fields = _stat_fields(f"/proc/{proc}/task/{tid}/stat")
            except OSError:
                continue  # a thread that ended between the listing and the read (its ticks are gone with it)
            out[f"{proc}/{tid}"] = (int(fields[11]) + int(fields[12])) / ticks
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

            server_pid = server.proc.pid
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
            who = "server" if tid.split("/")[0] == str(server_pid) else "worker"
            print(f"| {who} thread {tid} | {1000 * seconds / n:.2f} |")
    print(f"| load generator (this process) | {1000 * client / n:.2f} |")


if __name__ == "__main__":
    main()
