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
