"""The benchmark helpers that turn timings into the ratios the README reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench import common


class FakeClock:
    """A perf_counter whose time moves only when a case runs; every run costs its base time times a drift
    factor that grows linearly with the number of runs so far (a machine slowing down steadily)."""

    def __init__(self, drift: float) -> None:
        self.now = 0.0
        self.runs = 0
        self.drift = drift

    def __call__(self) -> float:
        return self.now

    def case(self, cost: float):
        def run() -> None:
            self.runs += 1
            self.now += cost * (1.0 + self.drift * self.runs)
        return run


def test_bracketed_ratio_cancels_linear_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(drift=0.01)
    monkeypatch.setattr(common.time, "perf_counter", clock)
    cases = {"ref": clock.case(1.0), "half": clock.case(2.0), "same": clock.case(1.0)}
    times, ratios = common.bracketed(cases, "ref", repeats=5, warmup=1)
    assert len(times["ref"]) == 5 * 3 and len(times["half"]) == len(times["same"]) == 5
    for got in ratios["half"]:
        assert got == pytest.approx(0.5, rel=1e-12)
    for got in ratios["same"]:
        assert got == pytest.approx(1.0, rel=1e-12)
    # pairing a case with one reference run of its round instead is biased by the same drift
    assert common.paired_ratio({"ref": times["ref"][::3], "half": times["half"]}, "half", "ref") < 0.499


def test_count_flops_includes_in_place_products_and_cpu_attention() -> None:
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    q = torch.randn(1, 2, 5, 4)

    def fn() -> None:
        with torch.inference_mode():
            out = layer(x)  # addmm: 2 * 3 * 8 * 4
            out.addmm_(x, layer.weight.t())  # in place: the same again
            torch.nn.functional.scaled_dot_product_attention(q, q, q)

    attention = 2 * (2 * 2 * 5 * 5 * 4)  # scores and weighted values, per head
    assert common.count_flops(fn) == 2 * (2 * 3 * 8 * 4) + attention


METRICS = """\
# HELP adapterserve_adapter_load_seconds Time to load one adapter
# TYPE adapterserve_adapter_load_seconds histogram
adapterserve_adapter_load_seconds_bucket{le="0.001",method="lora"} 0.0
adapterserve_adapter_load_seconds_bucket{le="0.0025",method="lora"} 4.0
adapterserve_adapter_load_seconds_bucket{le="0.005",method="lora"} 10.0
adapterserve_adapter_load_seconds_bucket{le="+Inf",method="lora"} 10.0
adapterserve_adapter_load_seconds_count{method="lora"} 10.0
adapterserve_adapter_load_seconds_sum{method="lora"} 0.03
adapterserve_adapter_load_seconds_bucket{method="seq_bn",le="0.001"} 0.0
adapterserve_adapter_load_seconds_bucket{method="seq_bn",le="0.0025"} 0.0
adapterserve_adapter_load_seconds_bucket{method="seq_bn",le="0.005"} 8.0
adapterserve_adapter_load_seconds_bucket{method="seq_bn",le="+Inf"} 10.0
adapterserve_adapter_load_seconds_count{method="seq_bn"} 10.0
adapterserve_adapter_load_seconds_sum{method="seq_bn"} 0.07
adapterserve_adapter_load_seconds_created{method="seq_bn"} 1.7e9
adapterserve_adapter_loads_total{result="ok"} 20.0
adapterserve_adapter_loads_total{result="error"} 1.0
adapterserve_adapters_resident 7.0
"""


def test_histograms_sum_over_extra_labels_and_split_on_request() -> None:
    (total,) = common.histograms(METRICS, "adapterserve_adapter_load_seconds").values()
    assert total.buckets == [(0.001, 0.0), (0.0025, 4.0), (0.005, 18.0), (float("inf"), 20.0)]
    assert total.total == 20 and total.sum == pytest.approx(0.1)
    split = common.histograms(METRICS, "adapterserve_adapter_load_seconds", by=("method",))
    assert set(split) == {(("method", "lora"),), (("method", "seq_bn"),)}
    assert (split[(("method", "lora"),)] + split[(("method", "seq_bn"),)]).buckets == total.buckets


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    (h,) = common.histograms(METRICS, "adapterserve_adapter_load_seconds").values()
    # rank 10 of 20: 6 ranks into the (2.5, 5] ms bucket of 14
    assert h.quantile(0.5) == pytest.approx(0.0025 + 0.0025 * 6 / 14)
    assert h.bucket_of(0.5) == (0.0025, 0.005)
    assert h.quantile(0.1) == pytest.approx(0.001 + 0.0015 * 2 / 4)
    assert h.quantile(0.99) == 0.005  # a rank in the +Inf bucket answers the largest finite bound
    assert h.bucket_of(0.99) == (0.005, float("inf"))
    empty = common.Histogram([(0.001, 0.0), (float("inf"), 0.0)], 0.0, 0.0)
    assert empty.quantile(0.5) != empty.quantile(0.5)  # NaN


def test_prom_value_matches_labels_and_ignores_other_metrics() -> None:
    assert common.prom_value(METRICS, "adapterserve_adapter_loads_total", result="ok") == 20
    assert common.prom_value(METRICS, "adapterserve_adapter_loads_total") == 21
    assert common.prom_value(METRICS, "adapterserve_adapters_resident") == 7
    assert common.prom_value(METRICS, "adapterserve_adapters") == 0


def test_histogram_difference_is_what_was_observed_in_between() -> None:
    (later,) = common.histograms(METRICS, "adapterserve_adapter_load_seconds").values()
    earlier = common.Histogram([(0.001, 0.0), (0.0025, 1.0), (0.005, 3.0), (float("inf"), 3.0)], 3.0, 0.01)
    delta = later - earlier
    assert delta.buckets == [(0.001, 0.0), (0.0025, 3.0), (0.005, 15.0), (float("inf"), 17.0)]
    assert delta.total == 17 and delta.sum == pytest.approx(0.09)


def test_process_cpu_seconds_and_child_pids_read_proc() -> None:
    """The scale bench's CPU accounting: a busy child shows up under its parent and its CPU time grows."""
    import os
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 5\nwhile time.time() < end: pass"])
    try:
        deadline = time.monotonic() + 10
        while child.pid not in common.child_pids(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in common.child_pids(os.getpid())
        first = common.process_cpu_seconds(child.pid)
        time.sleep(0.5)
        assert common.process_cpu_seconds(child.pid) > first
    finally:
        child.kill()
        child.wait()
    assert common.process_cpu_seconds(child.pid) == 0.0, "a process that is gone has used nothing we can read"
