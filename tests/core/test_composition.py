"""Tests for adapters_core.composition: block values, parsing, JSON form, validation."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest

from adapters_core.composition import (
    ALLOWED_NESTING,
    SUPPORTED_BLOCKS,
    AdapterCompositionBlock,
    Average,
    BatchSplit,
    Fuse,
    Parallel,
    Split,
    Stack,
    composition_from_json,
    composition_to_json,
    parse_composition,
    validate_composition,
)

METHODS: dict[str, set[str]] = {
    "a": {"bottleneck"},
    "b": {"bottleneck"},
    "c": {"bottleneck"},
    "lo": {"lora"},
    "lo2": {"lora"},
    "ia3": {"lora"},
    "pt": {"prefix_tuning"},
    "pt2": {"prefix_tuning"},
    "mam": {"prefix_tuning", "bottleneck"},
}

# ---------------------------------------------------------------------------------------------------
# block values
# ---------------------------------------------------------------------------------------------------


def test_repr_is_constructor_code() -> None:
    block = BatchSplit("a", Stack("b", "c"), batch_sizes=[3, 5])
    assert repr(block) == "BatchSplit('a', Stack('b', 'c'), batch_sizes=[3, 5])"
    assert repr(Fuse("a", "b")) == "Fuse('a', 'b')"
    assert repr(Fuse("a", "b", name="f")) == "Fuse('a', 'b', name='f')"
    assert repr(Split("a", "b", splits=[2, 3])) == "Split('a', 'b', splits=[2, 3])"
    assert repr(Average("a", "b", weights=[1, 3])) == "Average('a', 'b', weights=[0.25, 0.75])"
    assert repr(Parallel("a", "b")) == "Parallel('a', 'b')"
    assert eval(repr(block)) == block  # the repr is the code that builds the block


def test_eq_and_hash() -> None:
    a = BatchSplit("a", Stack("b", "c"), batch_sizes=[3, 5])
    b = BatchSplit("a", Stack("b", "c"), batch_sizes=(3, 5))
    assert a == b and hash(a) == hash(b)
    assert a != BatchSplit("a", Stack("b", "c"), batch_sizes=[4, 4])
    assert Stack("a", "b") != Parallel("a", "b")
    assert Stack("a", "b") != Stack("b", "a")
    assert Fuse("a", "b") != Fuse("a", "b", name="x")
    assert Fuse("a", "b") == Fuse("a", "b", name="a,b")
    assert Average("a", "b") == Average("a", "b", weights=[2, 2])
    assert Average("a", "b") != Average("a", "b", weights=[1, 2])
    assert len({Stack("a"), Stack("a"), Parallel("a"), Stack("a", "b")}) == 3
    assert Stack("a") != "a"


def test_immutable() -> None:
    block = BatchSplit("a", "b", batch_sizes=[1, 2])
    with pytest.raises(AttributeError):
        block.batch_sizes = (2, 1)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        block.children = ("c",)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        block.new_attribute = 1  # type: ignore[attr-defined]
    assert isinstance(block.children, tuple) and isinstance(block.batch_sizes, tuple)


def test_pickle_and_copy() -> None:
    block = Stack("a", Fuse("b", "c", name="f"), Average("a", Split("b", "c", splits=[1, 2]), weights=[1, 1]))
    assert pickle.loads(pickle.dumps(block)) == block
    assert copy.deepcopy(block) == block


def test_flatten_first_last() -> None:
    block = Stack("a", Parallel(Stack("b", "c"), BatchSplit("a", "d", batch_sizes=[1, 1])))
    assert block.flatten() == ("a", "b", "c", "d")
    assert block.first() == "a"
    assert block.last() == "d"
    assert Parallel(Stack("x", "y"), "z").first() == "x"
    assert list(block)[0] == "a" and len(block) == 2 and block[1] == block.children[1]


def test_fuse_name() -> None:
    assert Fuse("a", "b").name == "a,b"
    assert Fuse("a", Stack("b", "c")).name == "a,c"
    assert Fuse("a", "b", name="fusion").name == "fusion"
    with pytest.raises(ValueError, match="name"):
        Fuse("a", "b", name="")


def test_average_weights() -> None:
    assert Average("a", "b", "c").weights == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert Average("a", "b", weights=[1, 3]).weights == (0.25, 0.75)
    assert sum(Average("a", "b", "c", weights=[0.2, 0.2, 0.2]).weights) == pytest.approx(1.0)
    assert Average("a", "b", weights=[0, 2]).weights == (0.0, 1.0)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: Average("a", "b", weights=[1, -1]), "must be finite and >= 0"),
        (lambda: Average("a", "b", weights=[0, 0]), "sum to 0"),
        (lambda: Average("a", "b", weights=[1]), "1 entries for 2 children"),
        (lambda: Average("a", "b", weights=["x", 1]), "must be numbers"),
        (lambda: Average("a", "b", weights=[float("nan"), 1]), "finite"),
        (lambda: Split("a", "b", splits=[1]), "splits=[1] has 1 entries for 2 children"),
        (lambda: Split("a", "b", splits=[0, 2]), "must all be >= 1"),
        (lambda: Split("a", "b", splits="12"), "must be a list of ints"),
        (lambda: BatchSplit("a", "b", batch_sizes=[1, 2, 3]), "3 entries for 2 children"),
        (lambda: BatchSplit("a", "b", batch_sizes=[-1, 2]), "must all be >= 0"),
        (lambda: BatchSplit("a", "b", batch_sizes=[1.5, 2]), "must be a list of ints"),
        (lambda: Stack(), "needs at least one child"),
        (lambda: Stack("a", ""), "must not be empty"),
        (lambda: Stack("a", 3), "got 3"),
        (lambda: Stack(["a", "b"]), "must be an adapter name or a block"),
    ],
)
def test_bad_constructor_arguments(make: Any, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        make()
    assert needle in str(info.value)


def test_int_sizes_repeat_per_child() -> None:
    assert BatchSplit("a", "b", batch_sizes=2).batch_sizes == (2, 2)
    assert Split("a", "b", "c", splits=4).splits == (4, 4, 4)


# ---------------------------------------------------------------------------------------------------
# parse_composition
# ---------------------------------------------------------------------------------------------------


def test_parse_composition() -> None:
    assert parse_composition(None) is None
    assert parse_composition("") is None
    assert parse_composition([]) is None
    assert parse_composition("a") == Stack("a")
    assert parse_composition(["a", "b"]) == Stack("a", "b")
    assert parse_composition(("a", Fuse("b", "c"))) == Stack("a", Fuse("b", "c"))
    block = Parallel("a", "b")
    assert parse_composition(block) is block
    with pytest.raises(ValueError, match="cannot parse"):
        parse_composition(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Stack cannot hold"):
        parse_composition(Stack("a", Stack("b")))


# ---------------------------------------------------------------------------------------------------
# nesting: every pair of (parent, child) block types, checked against AdapterHub's table
# ---------------------------------------------------------------------------------------------------

SAMPLES: dict[type, Any] = {
    str: "a",
    Stack: Stack("a", "b"),
    Fuse: Fuse("a", "b"),
    Split: Split("a", "b", splits=[1, 1]),
    BatchSplit: BatchSplit("a", "b", batch_sizes=[1, 1]),
    Parallel: Parallel("a", "b"),
    Average: Average("a", "b"),
}
TABLE = {
    Stack: {str, Fuse, Split, Parallel, BatchSplit, Average},
    Fuse: {str, Stack},
    Split: {str, Split, Stack, BatchSplit, Average},
    Parallel: {str, Stack, BatchSplit, Average},
    BatchSplit: {str, Stack, Split, BatchSplit, Average},
    Average: {str, Stack, Split, BatchSplit},
}


def _wrap(parent: type, child: Any) -> AdapterCompositionBlock:
    if parent is Split:
        return Split(child, "c", splits=[2, 1])  # the child receives 2 positions
    if parent is BatchSplit:
        return BatchSplit(child, "c", batch_sizes=[2, 1])
    return parent(child, "c")


def test_allowed_nesting_constant_matches_table() -> None:
    assert {k: set(v) for k, v in ALLOWED_NESTING.items()} == TABLE


@pytest.mark.parametrize("parent", list(TABLE), ids=lambda t: t.__name__)
@pytest.mark.parametrize("child_type", list(SAMPLES), ids=lambda t: t.__name__)
def test_nesting_table(parent: type, child_type: type) -> None:
    block = _wrap(parent, SAMPLES[child_type])
    methods = {"a": {"bottleneck"}, "b": {"bottleneck"}, "c": {"bottleneck"}}
    if child_type in TABLE[parent]:
        assert parse_composition(block) is block
        validate_composition(block, methods)
    else:
        for check in (parse_composition, lambda s: validate_composition(s, methods)):
            with pytest.raises(ValueError) as info:
                check(block)
            message = str(info.value)
            assert repr(block) in message  # names the parent block
            assert repr(SAMPLES[child_type]) in message  # names the child block
            assert f"a {parent.__name__} may hold: adapter name" in message  # says what is allowed


def test_nesting_checked_deep_and_via_json() -> None:
    inner_bad = Stack("a", BatchSplit("b", Parallel("c"), batch_sizes=[1, 1]))
    with pytest.raises(ValueError, match=r"BatchSplit cannot hold Parallel\('c'\)"):
        validate_composition(inner_bad, METHODS)
    with pytest.raises(ValueError, match="Fuse cannot hold"):
        composition_from_json({"fuse": ["a", {"parallel": ["b", "c"]}]})


# ---------------------------------------------------------------------------------------------------
# validate_composition
# ---------------------------------------------------------------------------------------------------

VALID = [
    "a",
    ["a", "b"],
    Stack("a", Fuse("b", "c")),
    Fuse(Stack("a", "b"), "c"),
    Split("a", "b", splits=[2, 3]),
    BatchSplit("pt", "lo", "mam", "a", batch_sizes=[1, 1, 1, 1]),
    Parallel("pt", "lo", "a", "mam"),
    Average("lo", "ia3", "a"),
    Stack("pt", "lo", "a"),
    Stack("a", Parallel("b", Stack("lo", "c"))),
    BatchSplit(Stack("a", "b"), Split("a", "c", splits=[2, 3]), batch_sizes=[2, 2]),
    BatchSplit("a", BatchSplit("lo", "pt", batch_sizes=[1, 1]), batch_sizes=[2, 2]),
]


@pytest.mark.parametrize("setup", VALID, ids=repr)
def test_valid_setups(setup: Any) -> None:
    validate_composition(setup, METHODS, batch_size=4, seq_len=5)


def test_none_setup_is_valid() -> None:
    validate_composition(None, METHODS)


@pytest.mark.parametrize(
    ("setup", "block", "reason"),
    [
        (Stack("a", "zz"), "Stack('a', 'zz')", "unknown adapter 'zz'"),
        ("zz", "Stack('zz')", "unknown adapter 'zz'"),
        (
            Fuse("a", "lo"),
            "Fuse('a', 'lo')",
            "Fuse children must be bottleneck-only adapters, but 'lo' holds",
        ),
        (Fuse("a", Stack("b", "pt")), "Fuse('a', Stack('b', 'pt'))", "bottleneck-only"),
        (Fuse("a", "mam"), "Fuse('a', 'mam')", "'mam' holds ['bottleneck', 'prefix_tuning']"),
        (
            Average("pt", "a"),
            "Average('pt', 'a', weights=[0.5, 0.5])",
            "prefix_tuning, which does not support Average",
        ),
        (
            Average("mam", "a"),
            "Average('mam', 'a', weights=[0.5, 0.5])",
            "prefix_tuning, which does not support Average",
        ),
        (Split("pt", "a", splits=[2, 3]), "Split('pt', 'a', splits=[2, 3])", "does not support Split"),
        (
            Split("lo", "a", splits=[2, 3]),
            "Split('lo', 'a', splits=[2, 3])",
            "lora, which does not support Split",
        ),
        (
            BatchSplit("a", Split("b", "lo", splits=[2, 3]), batch_sizes=[2, 2]),
            "Split('b', 'lo', splits=[2, 3])",
            "lora, which does not support Split",
        ),
        (
            Average(Stack("a", "pt"), "b"),
            "Average(Stack('a', 'pt'), 'b', weights=[0.5, 0.5])",
            "'pt' holds prefix_tuning",
        ),
        (
            BatchSplit("a", "b", batch_sizes=[1, 2]),
            "BatchSplit('a', 'b', batch_sizes=[1, 2])",
            "batch_sizes sum to 3 but the batch it receives has 4 rows",
        ),
        (
            BatchSplit("a", BatchSplit("b", "c", batch_sizes=[1, 2]), batch_sizes=[2, 2]),
            "BatchSplit('b', 'c', batch_sizes=[1, 2])",
            "batch_sizes sum to 3 but the batch it receives has 2 rows",
        ),
        (
            Parallel("a", BatchSplit("b", "c", batch_sizes=[2, 1])),
            "BatchSplit('b', 'c', batch_sizes=[2, 1])",
            "has 4 rows",
        ),
        (
            Split("a", "b", splits=[1, 1]),
            "Split('a', 'b', splits=[1, 1])",
            "splits sum to 2 but the sequence it receives has 5 positions",
        ),
        (
            Split("a", Split("b", "c", splits=[1, 1]), splits=[2, 3]),
            "Split('b', 'c', splits=[1, 1])",
            "sequence it receives has 3 positions",
        ),
    ],
)
def test_invalid_setups_name_block_and_reason(setup: Any, block: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_composition(setup, METHODS, batch_size=4, seq_len=5)
    message = str(info.value)
    assert block in message
    assert reason in message


# Regression: these passed validation and then failed inside the forward pass (routing's internal
# FlattenError, or a RecursionError in the tree interpreter): an HTTP 500 on the server.
@pytest.mark.parametrize(
    ("setup", "block", "reason"),
    [
        (Stack(BatchSplit(Stack(Parallel("a", "b")), "c", batch_sizes=[2, 2])),
         "inside BatchSplit(Stack(Parallel('a', 'b')), 'c', batch_sizes=[2, 2])", "not inside a BatchSplit"),
        (Average(Stack(Parallel("a", "b")), "c"), "inside Average(", "not inside a Average"),
        (Split(Stack(Parallel("a", "b")), "c", splits=[2, 3]), "inside Split(", "not inside a Split"),
        (Fuse(Stack(Parallel("a", "b")), "c"), "inside Fuse(", "not inside a Fuse"),
        (Parallel(Stack(Parallel("a", "b")), "c"), "Parallel(Stack(Parallel('a', 'b')), 'c')",
         "at most one Parallel block per setup is supported, found 2"),
        (Stack(Parallel("a", "b"), Parallel("c", "a")), "Stack(Parallel('a', 'b'), Parallel('c', 'a'))",
         "at most one Parallel block"),
    ],
    ids=["stack-batchsplit-stack-parallel", "average", "split", "fuse", "parallel-in-parallel", "two-parallels"],
)
def test_parallel_only_at_the_top_of_a_setup(setup: Any, block: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_composition(setup, METHODS, batch_size=4, seq_len=5)
    assert block in str(info.value)
    assert reason in str(info.value)


def test_sizes_only_checked_when_given() -> None:
    validate_composition(BatchSplit("a", "b", batch_sizes=[1, 2]), METHODS)
    validate_composition(Split("a", "b", splits=[1, 1]), METHODS, batch_size=7)


def test_stack_after_parallel_sees_replicated_batch() -> None:
    setup = Stack(Parallel("a", "b"), BatchSplit("c", "a", batch_sizes=[4, 4]))
    validate_composition(setup, METHODS, batch_size=4)
    with pytest.raises(ValueError, match="has 8 rows"):
        validate_composition(
            Stack(Parallel("a", "b"), BatchSplit("c", "a", batch_sizes=[2, 2])), METHODS, batch_size=4
        )


def test_unknown_method_kind() -> None:
    with pytest.raises(ValueError, match=r"unknown method kind\(s\) \['reft'\]"):
        validate_composition("x", {"x": {"reft"}})


def test_supported_blocks_constant() -> None:
    everything = {Stack, Fuse, Split, BatchSplit, Parallel, Average}
    assert SUPPORTED_BLOCKS["bottleneck"] == everything
    assert SUPPORTED_BLOCKS["prefix_tuning"] == {Stack, Parallel, BatchSplit}
    assert SUPPORTED_BLOCKS["lora"] == {Stack, BatchSplit, Average, Parallel}


# ---------------------------------------------------------------------------------------------------
# JSON form
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ("a", Stack("a")),
        (["a", "b"], Stack("a", "b")),
        ({"stack": ["a", "b"]}, Stack("a", "b")),
        ({"fuse": ["a", "b"]}, Fuse("a", "b")),
        ({"fuse": ["a", "b"], "name": "f"}, Fuse("a", "b", name="f")),
        ({"fuse": [["a", "b"], "c"]}, Fuse(Stack("a", "b"), "c")),
        ({"parallel": ["a", {"stack": ["b", "c"]}]}, Parallel("a", Stack("b", "c"))),
        ({"average": ["a", "b"]}, Average("a", "b")),
        ({"average": ["a", "b"], "weights": [1, 3]}, Average("a", "b", weights=[0.25, 0.75])),
        (
            {"batch_split": ["a", {"stack": ["b", "c"]}], "batch_sizes": [3, 5]},
            BatchSplit("a", Stack("b", "c"), batch_sizes=[3, 5]),
        ),
        ({"split": ["a", "b"], "splits": [2, 3]}, Split("a", "b", splits=[2, 3])),
        (["a", {"fuse": ["b", "c"]}], Stack("a", Fuse("b", "c"))),
    ],
)
def test_composition_from_json(obj: Any, expected: AdapterCompositionBlock) -> None:
    block = composition_from_json(obj)
    assert block == expected
    again = composition_from_json(composition_to_json(block))
    assert again == block


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        (3, "adapters: expected an adapter name, a list or an object"),
        (None, "got NoneType"),
        ("", "must not be empty"),
        ([], "adapters: a block needs at least one child"),
        ({}, "exactly one block key"),
        ({"stack": ["a"], "fuse": ["b"]}, "exactly one block key"),
        ({"stak": ["a"]}, "got keys ['stak']"),
        ({"fuse": "a"}, "adapters.fuse: must be a list of children, got str"),
        ({"stack": []}, "adapters.stack: a block needs at least one child"),
        ({"stack": ["a"], "weights": [1]}, "unknown key(s) ['weights'] for 'stack'"),
        ({"split": ["a", "b"]}, "'split' needs ['splits']"),
        ({"batch_split": ["a", "b"]}, "'batch_split' needs ['batch_sizes']"),
        ({"batch_split": ["a", "b"], "batch_sizes": [1]}, "1 entries for 2 children"),
        ({"average": ["a", "b"], "weights": [-1, 2]}, ">= 0"),
        ({"fuse": ["a", 5]}, "adapters.fuse[1]: expected"),
        ({"stack": ["a", {"parallel": [{"x": 1}]}]}, "adapters.stack[1].parallel[0]"),
        ({"fuse": ["a"], "name": 3}, "name must be a non-empty string"),
        ({"stack": [{"stack": ["a"]}]}, "Stack cannot hold"),
    ],
)
def test_composition_from_json_errors(obj: Any, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        composition_from_json(obj)
    assert needle in str(info.value)


def test_composition_from_json_limits_size() -> None:
    deep: Any = "a"
    for _ in range(40):
        deep = {"parallel": [{"stack": [deep]}]}
    with pytest.raises(ValueError, match="too large"):
        composition_from_json(deep)
    with pytest.raises(ValueError, match="too large"):
        composition_from_json({"batch_split": ["a"] * 5000, "batch_sizes": [1] * 5000})
