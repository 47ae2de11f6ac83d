"""Residency over a real engine whose adapters live in slot pools: churn under a small budget never
touches a pinned adapter's rows, an evicted adapter reloads bit for bit, loads and evictions are counted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from adapters_core.methods import batching
from server.execution.engine import Engine, Segment
from server.execution.residency import Residency
from server.metrics import Metrics
from server.registry.store import AdapterStore, VersionMeta

CONFIGS = ("seq_bn",) + ("lora", "seq_bn") * 3  # one to pin, then others alternating in size


@pytest.fixture(autouse=True)
def gathered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two-row batches take the gathered path (weights read from the pools by slot index)."""
    monkeypatch.setattr(batching, "SEGMENT_MAX_RUNS", 0)


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, adapter_factory: Callable[[str, int], Path],
          tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, AdapterStore, list[VersionMeta]]:
    engine = Engine(str(tiny_model_dir), device="cpu")
    store = AdapterStore(tmp_path_factory.mktemp("slot-store"))
    metas = []
    for i, config in enumerate(CONFIGS):
        staged = store.staging_dir()
        for f in adapter_factory(config, 700 + i).iterdir():
            (staged / f.name).write_bytes(f.read_bytes())
        info = engine.inspect(staged)
        metas.append(store.commit("t", f"s{i}", staged, info, "u"))
    return engine, store, metas


def _embed(engine: Engine, names: list[str], ids: list[int]) -> np.ndarray:
    return np.concatenate(engine.embed([Segment(n, [ids]) for n in names]))


def _rows(engine: Engine, internal: str) -> list[tuple[int, int]]:
    slots = engine.model.adapters_registry.host.stack_cache.slots
    return [(id(hit[0].data), hit[1]) for p in engine.model._slot_parameters(internal) if (hit := slots.row_of(p))]


def test_churn_under_pins_and_bit_identical_reloads(setup: tuple[Engine, AdapterStore, list[VersionMeta]]) -> None:
    engine, store, metas = setup
    metrics = Metrics()
    others = metas[1:]
    budget = metas[0].nbytes + max(m.nbytes for m in others)  # the pinned adapter and one other
    cycle = others + others[:1]
    assert all(a.nbytes + b.nbytes > budget - metas[0].nbytes for a, b in zip(cycle, cycle[1:], strict=False)), "each load evicts"
    res = Residency(engine, budget, metrics, lambda m: store.version_dir(m.tenant, m.name, m.version))
    ids = engine.tokenize(["a short text to embed"])[0]
    pinned = metas[0]
    res.prepare([pinned])  # held by a long request while others come and go
    first = _embed(engine, [pinned.internal], ids)
    rows = _rows(engine, pinned.internal)
    assert rows, "the engine keeps adapters in slot pools"
    outputs: dict[str, np.ndarray] = {}
    for round_ in range(3):
        for meta in metas[1:]:
            res.prepare([meta])
            out = _embed(engine, [pinned.internal, meta.internal], ids)  # one mixed batch: a gather
            np.testing.assert_array_equal(_embed(engine, [pinned.internal], ids), first)  # its rows were never reused
            res.unpin_metas([meta])
            if round_ == 0:
                outputs[meta.internal] = out
            else:  # evicted in between (the budget holds two adapters) and reloaded, maybe into other rows
                np.testing.assert_array_equal(out, outputs[meta.internal])
        assert res.is_resident(pinned.internal) and _rows(engine, pinned.internal) == rows
    res.unpin_metas([pinned])
    loads = {m: metrics.adapter_loads.labels(result="ok", method=m)._value.get() for m in ("seq_bn", "lora")}
    evictions = {m: metrics.adapter_evictions.labels(method=m)._value.get() for m in ("seq_bn", "lora")}
    assert loads == {"seq_bn": 1 + 3 * 3, "lora": 3 * 3}, "every request after the first round reloaded"
    assert sum(evictions.values()) == sum(loads.values()) - len(res.resident())
    assert evictions["seq_bn"] > 0 and evictions["lora"] > 0
    assert engine.model.stack_cache_nbytes() == 0, "gathered from the pools, nothing restacked"
    assert metrics.adapter_load_seconds.labels(method="lora")._sum.get() > 0
