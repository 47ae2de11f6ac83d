"""Length buckets: a batch of short and long inputs runs as a pass of short rows and a pass of long rows, and
every row's result is the one a single padded pass gives."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from server.execution.engine import Engine, Segment, length_buckets
from tests.server.conftest import WORDS


def test_cuts_only_where_padding_is_saved() -> None:
    assert length_buckets([20] * 16, 2) == [list(range(16))]  # nothing to save
    assert length_buckets([5, 30, 6, 31, 5, 30], 2) == [[0, 1, 2, 3, 4, 5]]  # fewer than 2 x min_rows rows
    assert length_buckets([5, 30] * 8, 1) == [list(range(16))]  # bucketing off
    groups = length_buckets([5, 30] * 8, 2)
    assert groups == [list(range(0, 16, 2)), list(range(1, 16, 2))]  # each group keeps the original order
    # one row of 40 among 16 of 20-22: it cannot run alone (min_rows), so the long pass takes the three
    # next-longest rows with it
    lengths = [20, 21, 22, 20] * 4 + [40]
    short, long = length_buckets(lengths, 2)
    assert len(long) == 4 and 16 in long and all(lengths[i] == 22 for i in long if i != 16)
    three = length_buckets([4, 4, 4, 4, 30, 30, 30, 30, 60, 60, 60, 60], 3)
    assert [sorted(g) for g in three] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    # a pass must save 10% of the one-pass tokens: 16 rows of 30 and 16 of 28 stay together
    assert len(length_buckets([30] * 16 + [28] * 16, 2)) == 1


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path, adapter_factory: Callable[[str, int], Path]) -> tuple[Engine, Engine, list[str]]:
    one, two = Engine(str(tiny_model_dir), device="cpu"), Engine(str(tiny_model_dir), device="cpu", length_buckets=2)
    names = []
    for i, config in enumerate(["seq_bn", "lora", "prefix_tuning[prefix_length=4,bottleneck_size=16]"]):
        for engine in (one, two):
            engine.load(adapter_factory(config, 400 + i), f"b{i}")
        names.append(f"b{i}")
    return one, two, names


def test_buckets_give_the_single_pass_results(engines: tuple[Engine, Engine, list[str]]) -> None:
    one, two, names = engines
    rng = random.Random(5)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 3, 30, 40]))) for _ in range(24)]
    rows = one.tokenize(texts)
    segments = [Segment(names[0], rows[:8]), Segment(None, rows[8:12]), Segment(names[1], rows[12:18]),
                Segment(names[2], rows[18:])]
    passes: list[int] = []
    inner = two._hidden
    two._hidden = lambda inputs: passes.append(int(inputs["input_ids"].shape[1])) or inner(inputs)  # type: ignore[method-assign]
    try:
        got = two.embed(segments)
    finally:
        del two._hidden
    want = one.embed(segments)
    assert len(passes) == 2 and passes[0] < passes[1]  # a short pass, then a long one
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() < 1e-5
