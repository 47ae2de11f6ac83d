"""Tests for adapters_core.context.AdapterSetup: nesting, unwinding, heads, thread isolation."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from adapters_core.composition import Average, BatchSplit, Fuse, Parallel, Split, Stack
from adapters_core.context import AdapterSetup, default_head_setup


@pytest.fixture(autouse=True)
def _no_leftover_context() -> Iterator[None]:
    assert AdapterSetup.get_context() is None
    yield
    assert AdapterSetup.get_context() is None


def test_no_context_by_default() -> None:
    assert AdapterSetup.get_context() is None
    assert AdapterSetup.get_context_adapter_setup() is None
    assert AdapterSetup.get_context_head_setup() is None


def test_enter_parses_and_exposes_setup() -> None:
    with AdapterSetup("a") as ctx:
        assert AdapterSetup.get_context() is ctx
        assert ctx.adapter_setup == Stack("a")
        assert AdapterSetup.get_context_adapter_setup() == Stack("a")
        assert AdapterSetup.get_context_head_setup() == "a"
    with AdapterSetup(["a", "b"]) as ctx:
        assert ctx.adapter_setup == Stack("a", "b")


def test_nesting_innermost_wins() -> None:
    with AdapterSetup("outer") as outer:
        with AdapterSetup(Stack("x", "y")) as inner:
            assert AdapterSetup.get_context() is inner
            with AdapterSetup("innermost") as innermost:
                assert AdapterSetup.get_context() is innermost
            assert AdapterSetup.get_context() is inner
        assert AdapterSetup.get_context() is outer
    assert AdapterSetup.get_context() is None


def test_same_instance_reentered() -> None:
    setup = AdapterSetup("a")
    with setup, setup:
        assert AdapterSetup.get_context() is setup
    assert AdapterSetup.get_context() is None


def test_pops_on_exception() -> None:
    with AdapterSetup("outer") as outer:
        with pytest.raises(RuntimeError, match="boom"):
            with AdapterSetup("a"), AdapterSetup("b"):
                raise RuntimeError("boom")
        assert AdapterSetup.get_context() is outer
    assert AdapterSetup.get_context() is None


def test_exception_is_not_swallowed() -> None:
    with pytest.raises(KeyError):
        with AdapterSetup("a"):
            raise KeyError("x")


def test_none_setup_pushes_an_empty_context() -> None:
    with AdapterSetup("outer"):
        with AdapterSetup(None) as ctx:
            # An explicit "no adapters" context overrides the outer one.
            assert AdapterSetup.get_context() is ctx
            assert ctx.adapter_setup is None
            assert ctx.head_setup is None


@pytest.mark.parametrize("empty", [None, "", []])
def test_ignore_empty_is_a_no_op(empty: object) -> None:
    with AdapterSetup("outer") as outer:
        with AdapterSetup(empty, ignore_empty=True) as ctx:
            assert AdapterSetup.get_context() is outer
            assert ctx.adapter_setup is None
        assert AdapterSetup.get_context() is outer


def test_ignore_empty_with_a_setup_still_pushes() -> None:
    with AdapterSetup("a", ignore_empty=True) as ctx:
        assert AdapterSetup.get_context() is ctx
    with AdapterSetup(None, head_setup="h", ignore_empty=True) as ctx:
        assert AdapterSetup.get_context() is ctx  # an explicit head is not empty


def test_explicit_head_setup_wins() -> None:
    with AdapterSetup(Stack("a", "b"), head_setup="head") as ctx:
        assert ctx.head_setup == "head"
        assert AdapterSetup.get_context_head_setup() == "head"
    with pytest.raises(ValueError, match="head_setup"):
        AdapterSetup("a", head_setup=3)  # type: ignore[arg-type]


def test_invalid_setup_raises_before_entering() -> None:
    with pytest.raises(ValueError, match="Stack cannot hold"):
        AdapterSetup(Stack("a", Stack("b")))


def test_out_of_order_exit_is_an_error() -> None:
    first, second = AdapterSetup("a"), AdapterSetup("b")
    first.__enter__()
    second.__enter__()
    with pytest.raises(RuntimeError, match="out of order"):
        first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    first.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------------
# default head setup
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "heads"),
    [
        (None, None),
        ("a", "a"),
        (Stack("a"), "a"),
        (Stack("a", "b", "c"), "c"),
        (Parallel("a", "b"), Parallel("a", "b")),
        (Stack("x", Parallel("a", Stack("b", "c"))), Parallel("a", "c")),
        (BatchSplit("a", "b", batch_sizes=[1, 2]), BatchSplit("a", "b", batch_sizes=[1, 2])),
        (
            BatchSplit("a", Stack("b", "c"), batch_sizes=[3, 5]),
            BatchSplit("a", "c", batch_sizes=[3, 5]),
        ),
        (
            BatchSplit("a", BatchSplit("b", "c", batch_sizes=[1, 1]), batch_sizes=[2, 2]),
            BatchSplit("a", BatchSplit("b", "c", batch_sizes=[1, 1]), batch_sizes=[2, 2]),
        ),
        (
            BatchSplit("a", Average("b", "c"), batch_sizes=[2, 2]),
            BatchSplit("a", "c", batch_sizes=[2, 2]),
        ),
        (Fuse("a", "b"), None),
        (Stack("x", Fuse("a", "b", name="f")), None),
        (Average("a", "b"), None),
        (Split("a", "b", splits=[1, 1]), None),
    ],
)
def test_default_head_setup(setup: object, heads: object) -> None:
    assert default_head_setup(setup) == heads  # type: ignore[arg-type]
    with AdapterSetup(setup) as ctx:
        assert ctx.head_setup == heads


# ---------------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------------


def test_threads_never_see_each_others_setups() -> None:
    n_threads, rounds = 8, 300
    barrier = threading.Barrier(n_threads, timeout=30)
    errors: list[str] = []
    main_context = AdapterSetup("main")

    def worker(i: int) -> None:
        try:
            name = f"adapter_{i}"
            mine = BatchSplit(name, Stack(f"{name}_x", "shared"), batch_sizes=[i + 1, 1])
            assert AdapterSetup.get_context() is None  # the main thread's context is invisible
            with AdapterSetup(mine) as ctx:
                barrier.wait()  # every thread holds its own setup from here on
                for r in range(rounds):
                    if AdapterSetup.get_context() is not ctx or ctx.adapter_setup != mine:
                        errors.append(f"thread {i} round {r}: saw {AdapterSetup.get_context()!r}")
                        return
                    if r % 10 == 0:  # nest and unwind while the others keep checking
                        with AdapterSetup(f"{name}_inner") as inner:
                            if AdapterSetup.get_context() is not inner:
                                errors.append(f"thread {i}: inner context lost")
                        if AdapterSetup.get_context() is not ctx:
                            errors.append(f"thread {i}: outer context lost after inner exit")
                    if r == rounds // 2:
                        barrier.wait()  # realign mid-way so the loops overlap
                head = AdapterSetup.get_context_head_setup()
                if head != BatchSplit(name, "shared", batch_sizes=[i + 1, 1]):
                    errors.append(f"thread {i}: head setup {head!r}")
            barrier.wait()
            if AdapterSetup.get_context() is not None:
                errors.append(f"thread {i}: context left after exit")
        except Exception as exc:  # reported to the main thread
            errors.append(f"thread {i}: {exc!r}")
            barrier.abort()

    with main_context:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert AdapterSetup.get_context() is main_context
    assert errors == []
