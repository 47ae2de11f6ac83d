"""Resident adapters in slot pools: rows handed out and freed, gathers by slot index, reloads bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters_core import BatchSplit
from adapters_core.methods import batching
from adapters_core.methods.bottleneck import apply as bottleneck_apply

from .conftest import add_noise, build, make_inputs, max_diff, run, valid

ARCHS = ("bert", "gpt2", "llama")
METHODS = ("seq_bn", "lora", "par_bn", "lora[r=4]", "ia3")


@pytest.fixture(autouse=True)
def gathered_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make inference take the gathered path even for the few rows these tests use."""
    monkeypatch.setattr(batching, "SEGMENT_MAX_RUNS", 0)
    assert bottleneck_apply.segment_runs is batching.segment_runs


def _slotted(arch: str) -> torch.nn.Module:
    model = build(arch)
    model.enable_adapter_slots()
    return model


def _saved(tmp_path: Path, arch: str, n: int) -> list[Path]:
    """n noisy adapters cycling through METHODS, saved by a model without slots."""
    src = build(arch)
    out = []
    for i in range(n):
        src.add_adapter(f"s{i}", METHODS[i % len(METHODS)])
        add_noise(src, f"s{i}", seed=10 + i)
        src.save_adapter(str(tmp_path / f"s{i}"), f"s{i}")
        out.append(tmp_path / f"s{i}")
    return out


def _slots(model: torch.nn.Module):  # noqa: ANN202 - the model's pools
    return model.adapters_registry.host.stack_cache.slots


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_are_handed_out_freed_and_reused(arch: str) -> None:
    model = _slotted(arch)
    slots = _slots(model)
    model.add_adapter("a", "seq_bn")
    model.add_adapter("b", "seq_bn")
    rows = {}
    for name in ("a", "b"):
        placed = model._slot_parameters(name)
        assert placed, "a seq_bn adapter has parameters to place"
        hits = [slots.row_of(p) for p in placed]
        assert all(h is not None for h in hits), "every stacked parameter views a pool row"
        rows[name] = {(id(h[0]), h[1]) for h in hits}
    assert not rows["a"] & rows["b"], "two adapters never share a row"
    assert {pool for pool, _ in rows["a"]} == {pool for pool, _ in rows["b"]}, "same shapes share pools"
    held = slots.stats()["rows"]
    model.delete_adapter("a")
    assert slots.stats()["rows"] == held - len(rows["a"])
    model.add_adapter("c", "seq_bn")
    rows_c = {(id(h[0]), h[1]) for p in model._slot_parameters("c") if (h := slots.row_of(p))}
    assert rows_c == rows["a"], "a freed row is handed out again before the pool grows"


@pytest.mark.parametrize("arch", ARCHS)
def test_growth_keeps_values_and_mixed_batches_gather_from_the_pools(arch: str, tmp_path: Path) -> None:
    folders = _saved(tmp_path, arch, 12)
    plain, slotted = build(arch), _slotted(arch)
    for model in (plain, slotted):
        for i, folder in enumerate(folders):
            model.load_adapter(str(folder), load_as=f"s{i}")
    assert _slots(slotted).stats()["capacity"] > 4 * _slots(slotted).stats()["pools"], "the pools grew"
    for i in range(12):
        for (key, p), (_, q) in zip(plain.adapter_named_parameters(f"s{i}"), slotted.adapter_named_parameters(f"s{i}"), strict=True):
            assert torch.equal(p, q), f"{key} changed when its pool grew"
    inputs = make_inputs(arch, batch=12)
    split = BatchSplit(*(f"s{i}" for i in range(12)), batch_sizes=[1] * 12)
    want, got = run(plain, inputs, split), run(slotted, inputs, split)
    assert max_diff(want, got, valid(inputs)) < 1e-5
    assert slotted.stack_cache_nbytes() == 0, "resident adapters are gathered from their pools, never restacked"
    assert plain.stack_cache_nbytes() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_a_reloaded_adapter_gives_bit_identical_results(arch: str, tmp_path: Path) -> None:
    folders = _saved(tmp_path, arch, 8)
    model = _slotted(arch)
    for i, folder in enumerate(folders):
        model.load_adapter(str(folder), load_as=f"s{i}")
    inputs = make_inputs(arch, batch=8)
    split = BatchSplit(*(f"s{i}" for i in range(8)), batch_sizes=[1] * 8)
    before = run(model, inputs, split)
    slots = _slots(model)
    rows_before = [slots.row_of(p)[1] for p in model._slot_parameters("s1")]
    for victim in ("s1", "s5", "s3"):  # evict in another order than loaded, then reload: rows move
        model.delete_adapter(victim)
    for victim in ("s3", "s5", "s1"):
        model.load_adapter(str(folders[int(victim[1:])]), load_as=victim)
    rows_after = [slots.row_of(p)[1] for p in model._slot_parameters("s1")]
    assert rows_after != rows_before, "the test means to reload into other rows"
    assert torch.equal(run(model, inputs, split), before)


def test_compaction_bounds_free_rows_and_keeps_values(tmp_path: Path) -> None:
    folders = _saved(tmp_path, "bert", 16)
    model = _slotted("bert")
    for i, folder in enumerate(folders):
        model.load_adapter(str(folder), load_as=f"s{i}")
    inputs = make_inputs("bert", batch=4)
    keep = ("s0", "s4", "s9", "s13")
    split = BatchSplit(*keep, batch_sizes=[1] * 4)
    before = run(model, inputs, split)
    slots = _slots(model)
    slots.slack_limit = 4096
    for i in range(16):
        if f"s{i}" not in keep:
            model.delete_adapter(f"s{i}")
    assert slots.free_nbytes <= 4096 + max(p.row_bytes for p in slots._pools.values())
    assert torch.equal(run(model, inputs, split), before)
    assert all(slots.row_of(p) is not None for name in keep for p in model._slot_parameters(name))


def test_full_pools_grow_geometrically_even_without_slack(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no slack left a pool still grows by a sixteenth, so it is copied a few times per doubling and not
    at every load (the row-by-row growth made cold loads into a large cache take 100+ ms)."""
    model = _slotted("bert")
    slots = _slots(model)
    slots.slack_limit = 0
    resizes: list[int] = []
    real = slots._resize
    monkeypatch.setattr(slots, "_resize", lambda pool, capacity, rows=None: (resizes.append(id(pool)), real(pool, capacity, rows))[1])
    for i in range(150):
        model.add_adapter(f"a{i}", "seq_bn")
    rows = max(len(p.owners) for p in slots._pools.values())
    assert rows >= 150
    per_pool = max(resizes.count(k) for k in set(resizes))
    assert per_pool <= rows // 4, f"{per_pool} copies of a pool of {rows} rows"
    assert slots.free_nbytes <= sum(p.capacity * p.row_bytes for p in slots._pools.values()) // 8


def test_training_an_adapter_in_a_pool_updates_its_row() -> None:
    model = _slotted("bert")
    model.add_adapter("t", "lora")
    model.train_adapter("t")
    inputs = make_inputs("bert")
    loss = model(**inputs).last_hidden_state.pow(2).mean()
    loss.backward()
    params = model._slot_parameters("t")
    assert all(p.grad is not None for p in params)
    with torch.no_grad():
        for p in params:
            p.sub_(0.1 * p.grad)
    slots = _slots(model)
    for p in params:
        pool, row = slots.row_of(p)
        view = pool.data[row].t() if pool.transposed else pool.data[row]
        assert torch.equal(view, p), "the pool row is the parameter itself"
