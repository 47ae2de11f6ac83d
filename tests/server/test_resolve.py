"""Composition resolution: renaming works on blocks (every block type keeps its parameters), and resolve pins a
request's names to stored versions (no model)."""

from __future__ import annotations

import pytest

from adapters_core.composition import (
    AdapterCompositionBlock,
    Average,
    BatchSplit,
    Fuse,
    Parallel,
    Split,
    Stack,
)
from server.errors import InvalidComposition, UnknownAdapter
from server.registry.store import FileInfo, VersionMeta
from server.scheduling.resolve import FusionLookup, rename, resolve


def upper(name: str) -> str:
    return name.upper()


@pytest.mark.parametrize(("block", "want"), [
    (Stack("a", "b"), Stack("A", "B")),
    (Parallel("a", "b"), Parallel("A", "B")),
    (Split("a", "b", splits=[3, 5]), Split("A", "B", splits=[3, 5])),
    (BatchSplit("a", "b", batch_sizes=[2, 1]), BatchSplit("A", "B", batch_sizes=[2, 1])),
    (BatchSplit("a", None, batch_sizes=[2, 1]), BatchSplit("A", None, batch_sizes=[2, 1])),
    (Average("a", "b", weights=[0.25, 0.75]), Average("A", "B", weights=[0.25, 0.75])),
    (Fuse("a", "b"), Fuse("A", "B")),
    (Fuse("a", "b", name="my_fusion"), Fuse("A", "B", name="my_fusion")),
    (
        Stack(Fuse("a", "b"), BatchSplit(Stack("c", "d"), Split("e", Average("f", "g", weights=[1, 3]), splits=[1, 2]),
                                         batch_sizes=[4, 4]), Parallel("h", Stack("i"))),
        Stack(Fuse("A", "B"), BatchSplit(Stack("C", "D"), Split("E", Average("F", "G", weights=[1, 3]), splits=[1, 2]),
                                         batch_sizes=[4, 4]), Parallel("H", Stack("I"))),
    ),
], ids=["stack", "parallel", "split", "batch_split", "batch_split_base_rows", "average", "fuse", "fuse_named", "nested"])
def test_rename_rebuilds_every_block_with_its_parameters(block: AdapterCompositionBlock, want: AdapterCompositionBlock) -> None:
    got = rename(block, upper)
    assert got == want
    assert repr(got) == repr(want)  # same types and parameters, also those equality may not look at
    assert rename(block, lambda n: n) == block


def test_rename_keeps_each_blocks_parameters() -> None:
    got = rename(Stack(Split("a", "b", splits=[3, 5]), BatchSplit("c", "d", batch_sizes=[1, 2]),
                       Average("e", "f", weights=[1, 3]), Fuse("g", "h", name="gh")), upper)
    assert isinstance(got, Stack)
    split, batch_split, average, fuse = got.children
    assert isinstance(split, Split) and split.splits == (3, 5)
    assert isinstance(batch_split, BatchSplit) and batch_split.batch_sizes == (1, 2)
    assert isinstance(average, Average) and average.weights == (0.25, 0.75)
    assert isinstance(fuse, Fuse) and fuse.name == "gh" and fuse.children == ("G", "H")
    default = rename(Fuse("g", "h"), upper)
    assert isinstance(default, Fuse) and default.name == "G,H"  # a default name follows the renamed children


def test_rename_hands_fuse_blocks_to_the_hook() -> None:
    seen: list[Fuse] = []

    def pin(f: Fuse) -> Fuse:
        seen.append(f)
        return Fuse("x1", "x2", name="fx")

    got = rename(Stack("a", Fuse("b", "c")), upper, pin)
    assert got == Stack("A", Fuse("x1", "x2", name="fx"))
    assert seen == [Fuse("b", "c")]  # the hook gets the caller's block, children not renamed


def meta(name: str, method: str = "seq_bn", methods: tuple[str, ...] = ("bottleneck",), **extra: object) -> VersionMeta:
    return VersionMeta(tenant="t", name=name, version=1, created="2024-01-01T00:00:00", uploader="t:k", method=method,
                       methods=methods, has_head=False, nbytes=1, files={"adapter.safetensors": FileInfo("0" * 64, 1)},
                       sha256=name * 4, size=1, extra=dict(extra))


def test_resolve_pins_every_block_type_to_internal_names() -> None:
    metas = {n: meta(n) for n in "abcdef"}
    fusion = meta("fab", method="fusion", methods=("fusion",),
                  fuses=[{"tenant": "t", "name": n, "version": 1, "internal": metas[n].internal} for n in "ab"])
    fusions = FusionLookup(lambda names: fusion if names == ("a", "b") else None, lambda t, n, v: metas.get(n))
    spec = {"stack": [
        {"fuse": ["a", "b"]},
        {"batch_split": [["c"], {"average": ["d", "e"], "weights": [1, 3]}], "batch_sizes": [2, 2]},
        {"split": ["f", "c"], "splits": [4, 6]},
    ]}
    resolved = resolve(spec, metas.get, None, "embedding", fusions)
    i = {n: m.internal for n, m in metas.items()}
    assert resolved.block == Stack(
        Fuse(i["a"], i["b"], name=fusion.internal),
        BatchSplit(Stack(i["c"]), Average(i["d"], i["e"], weights=[0.25, 0.75]), batch_sizes=[2, 2]),
        Split(i["f"], i["c"], splits=[4, 6]),
    )
    assert [m.name for m in resolved.metas] == ["a", "b", "c", "d", "e", "f", "fab"]
    assert not resolved.solo


def test_resolve_single_name_and_base_rows() -> None:
    metas = {"a": meta("a")}
    assert resolve("a", metas.get, None, "embedding").block == metas["a"].internal
    resolved = resolve({"batch_split": ["a", None], "batch_sizes": [1, 1]}, metas.get, None, "embedding")
    assert resolved.block == BatchSplit(metas["a"].internal, None, batch_sizes=[1, 1])


def test_resolve_errors_are_domain_errors() -> None:
    metas = {"a": meta("a")}
    with pytest.raises(UnknownAdapter, match="'nope'"):
        resolve({"stack": ["a", "nope"]}, metas.get, None, "embedding")
    with pytest.raises(InvalidComposition):
        resolve({"fuse": ["a", "a"]}, metas.get, None, "embedding")
