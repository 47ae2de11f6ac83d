"""Forward lanes: a batch cut into parts by length, run side by side on lane threads with one intra-op thread each;
every row's result is the one a single padded pass gives, and the calling thread keeps all its threads."""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from server.execution.engine import Engine, Segment, auto_lanes, lane_parts, lane_pool
from tests.server.conftest import WORDS, with_head


def _cost(lengths: list[int], parts: list[list[int]]) -> int:
    return max(len(p) * max(lengths[i] for i in p) for p in parts)


@pytest.mark.parametrize("seed", range(40))
def test_lane_parts_partition_the_rows_with_the_least_largest_part(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(2, 9))]
    lanes = rng.randint(2, 3)
    parts = lane_parts(lengths, lanes)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    assert all(p and p == sorted(p) for p in parts) and len(parts) <= lanes
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = min(  # every way to cut the length order into at most `lanes` consecutive groups
        _cost(lengths, [order[a:b] for a, b in zip((0, *cut), (*cut, len(order)), strict=True)])
        for k in range(lanes) for cut in itertools.combinations(range(1, len(order)), k)
    )
    assert _cost(lengths, parts) == best


def test_lane_parts_leave_a_single_row_and_one_lane_alone() -> None:
    assert lane_parts([7], 2) == [[0]]
    assert lane_parts([3, 9, 4], 1) == [[0, 1, 2]]
    assert lane_parts([5, 5, 5, 5], 2) == [[0, 1], [2, 3]]
    assert lane_parts([30, 2, 3, 29], 2) == [[1, 2], [0, 3]]


def test_auto_lanes_are_two_on_a_cpu_with_two_threads_only() -> None:
    assert auto_lanes(torch.device("cpu"), 2) == 2
    assert auto_lanes(torch.device("cpu"), 1) == 1
    assert auto_lanes(torch.device("cuda"), 16) == 1


def test_lane_threads_have_their_own_intra_op_count() -> None:
    before = torch.get_num_threads()
    pool = lane_pool(2, 1)
    try:
        everyone = threading.Barrier(2)

        def inside() -> tuple[str, int]:
            everyone.wait(30)  # both lanes at once: two distinct threads
            return threading.current_thread().name, torch.get_num_threads()

        seen = [f.result() for f in [pool.submit(inside) for _ in range(2)]]
    finally:
        pool.shutdown()
    assert len({name for name, _ in seen}) == 2 and all(n == 1 for _, n in seen)
    assert torch.get_num_threads() == before  # this thread's own count is its own


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path, adapter_factory: Callable[[str, int], Path]) -> tuple[Engine, Engine, list[str]]:
    one = Engine(str(tiny_model_dir), device="cpu", length_buckets=1, lanes=1)
    two = Engine(str(tiny_model_dir), device="cpu", length_buckets=1, lanes=2)
    names = []
    for i, config in enumerate(["seq_bn", "lora", "prefix_tuning[prefix_length=4,bottleneck_size=16]", "ia3"]):
        for engine in (one, two):
            engine.load(adapter_factory(config, 600 + i), f"l{i}")
        names.append(f"l{i}")
    yield one, two, names
    one.close()
    two.close()


def _segments(engine: Engine, names: list[str], seed: int = 5) -> list[Segment]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 3, 30, 40]))) for _ in range(26)]
    rows = engine.tokenize(texts)
    return [Segment(names[0], rows[:7]), Segment(None, rows[7:11]), Segment(names[1], rows[11:17]),
            Segment(names[2], rows[17:22]), Segment(names[3], rows[22:])]


def test_lanes_run_the_parts_side_by_side_and_give_the_single_pass_results(engines) -> None:  # noqa: ANN001
    one, two, names = engines
    segments = _segments(one, names)
    seen: list[tuple[str, int, int]] = []
    inner = two._hidden
    meet = threading.Barrier(2)

    def hidden(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.append((threading.current_thread().name, int(inputs["input_ids"].shape[1]), torch.get_num_threads()))
        meet.wait(30)  # returns only when the other part is in its forward pass too
        return inner(inputs)

    two._hidden = hidden  # type: ignore[method-assign]
    try:
        got = two.embed(segments)
    finally:
        del two._hidden
    want = one.embed(segments)
    assert len(seen) == 2 and len({name for name, _, _ in seen}) == 2
    assert all(name.startswith("lane") and n == 1 for name, _, n in seen)
    assert sorted(width for _, width, _ in seen)[0] < sorted(width for _, width, _ in seen)[1]  # cut by length
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() < 1e-5


def test_a_single_row_runs_on_the_calling_thread_with_all_threads(engines) -> None:  # noqa: ANN001
    _, two, names = engines
    seen: list[tuple[str, int]] = []
    inner = two._hidden
    two._hidden = lambda inputs: seen.append((threading.current_thread().name, torch.get_num_threads())) or inner(inputs)  # type: ignore[method-assign]
    caller: list[tuple[str, int]] = []

    def call() -> None:
        two.embed([Segment(names[1], two.tokenize(["one short text"]))])
        caller.append((threading.current_thread().name, torch.get_num_threads()))

    runner = threading.Thread(target=call, name="inference-test")
    try:
        runner.start()
        runner.join(60)
    finally:
        del two._hidden
    assert seen == [("inference-test", two.threads)] and caller == seen


def test_an_error_in_one_part_is_raised_after_both_parts_end(engines) -> None:  # noqa: ANN001
    _, two, names = engines
    segments = _segments(two, names)
    inner = two._hidden
    widths: list[int] = []
    ended: list[int] = []
    meet = threading.Barrier(2)

    def hidden(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        width = int(inputs["input_ids"].shape[1])
        widths.append(width)
        meet.wait(30)
        if width == max(widths):
            raise ValueError("this part cannot run")
        out = inner(inputs)
        ended.append(width)
        return out

    two._hidden = hidden  # type: ignore[method-assign]
    try:
        with pytest.raises(ValueError, match="this part cannot run"):
            two.embed(segments)
    finally:
        del two._hidden
    assert len(ended) == 1  # the other part ran to its end before the error reached the caller
    assert len(two.embed(segments)) == len(segments)  # and the lanes still work


def test_classification_with_lanes_equals_one_pass(engines, adapter_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """Rows for two classifiers with different label sets, cut into lane parts: each row's label and logits as in
    one pass."""
    one, two, names = engines
    folders = {"c0": with_head(adapter_factory("seq_bn", 610), tmp_path / "c0", ("neg", "pos"), seed=4),
               "c1": with_head(adapter_factory("lora", 611), tmp_path / "c1", ("a", "b", "c"), seed=5)}
    for engine in (one, two):
        for name, folder in folders.items():
            engine.load(folder, name)
    rows = [r for s in _segments(one, names) for r in s.rows]
    segments = [Segment("c0", rows[:13], "c0"), Segment("c1", rows[13:], "c1")]
    labels = {"c0": {0: "neg", 1: "pos"}, "c1": {0: "a", 1: "b", 2: "c"}}
    widths: list[int] = []
    inner = two.model.forward
    two.model.forward = lambda **kw: widths.append(int(kw["input_ids"].shape[1])) or inner(**kw)  # type: ignore[method-assign]
    try:
        got = two.classify(segments, labels)
    finally:
        del two.model.forward
    want = one.classify(segments, labels)
    assert len(widths) == 2
    for g_seg, w_seg in zip(got, want, strict=True):
        assert [g.label for g in g_seg] == [w.label for w in w_seg]
        assert np.abs(np.array([g.logits for g in g_seg]) - np.array([w.logits for w in w_seg])).max() < 1e-4
