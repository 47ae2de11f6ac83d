"""Read-ahead: adapter folders read on a side thread are what a load would read, are used only while the folder
is unchanged, never turn a failed read into a load, stay within their bounds, and reach the engine from the
runner (queued requests' adapters) and across the worker's socket."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from server.execution.engine import Engine, Segment
from server.execution.read_ahead import ReadAhead
from server.execution.residency import Residency
from server.execution.worker import WorkerEngine
from server.metrics import Metrics
from server.registry.store import AdapterStore, VersionMeta
from server.scheduling.batcher import Job
from server.scheduling.resolve import Resolved
from server.scheduling.runner import Work, make_runner

CONFIGS = ("seq_bn", "lora", "prefix_tuning[prefix_length=4,bottleneck_size=16]", "ia3")


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine(str(tiny_model_dir), device="cpu")


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def _same_files(a: object, b: object) -> None:
    assert a.name == b.name and a.config == b.config and a.meta == b.meta  # type: ignore[attr-defined]
    assert a.state.keys() == b.state.keys()  # type: ignore[attr-defined]
    for key, value in a.state.items():  # type: ignore[attr-defined]
        assert torch.equal(value, b.state[key]), key  # type: ignore[attr-defined]


@pytest.mark.parametrize("config", CONFIGS)
def test_take_hands_out_what_the_load_would_read(engine: Engine, config: str, adapter_factory: Callable[[str, int], Path]) -> None:
    folder = adapter_factory(config, 900)
    ahead = ReadAhead(lambda f: engine.model.read_adapter_files(str(f)))
    ahead.want([folder])
    ahead.want([folder])  # already under way: not read twice
    assert len(ahead) == 1
    got = ahead.take(folder)
    assert got is not None and ahead.hits == 1 and len(ahead) == 0
    _same_files(got, engine.model.read_adapter_files(str(folder)))
    assert ahead.take(folder) is None and ahead.misses == 1  # taken once
    ahead.close()


def test_a_folder_changed_since_its_read_is_read_again(tmp_path: Path, engine: Engine,
                                                       adapter_factory: Callable[[str, int], Path]) -> None:
    folder = _copy(adapter_factory("lora", 901), tmp_path / "v1")
    ahead = ReadAhead(lambda f: engine.model.read_adapter_files(str(f)))
    ahead.want([folder])
    ahead._entries[folder].future.result()
    other = adapter_factory("lora", 902) / "adapter.safetensors"
    (folder / "adapter.safetensors").write_bytes(other.read_bytes())  # same size, new bytes and mtime
    assert ahead.take(folder) is None and ahead.misses == 1
    ahead.close()


def test_a_failed_read_is_never_handed_out(tmp_path: Path, engine: Engine, adapter_factory: Callable[[str, int], Path]) -> None:
    folder = _copy(adapter_factory("seq_bn", 903), tmp_path / "broken")
    (folder / "adapter.safetensors").write_bytes(b"not a safetensors file")
    ahead = ReadAhead(lambda f: engine.model.read_adapter_files(str(f)))
    ahead.want([folder, tmp_path / "missing"])  # a folder that does not exist is not even queued
    assert len(ahead) == 1
    assert ahead.take(folder) is None
    with pytest.raises(ValueError, match="safetensors"):  # the load reads the folder itself and says what is wrong
        engine.load(folder, "broken")
    ahead.close()


def test_a_load_never_waits_behind_other_reads(engine: Engine, adapter_factory: Callable[[str, int], Path]) -> None:
    first, second = adapter_factory("seq_bn", 905), adapter_factory("lora", 906)
    gate = threading.Event()

    def read(folder: Path) -> object:
        if folder == first:
            assert gate.wait(30)
        return engine.model.read_adapter_files(str(folder))

    ahead = ReadAhead(read)  # type: ignore[arg-type]
    ahead.want([first, second])
    assert ahead.take(second) is None and ahead.misses == 1  # queued behind `first`: cancelled, read by the caller
    gate.set()
    assert ahead.take(first) is not None and ahead.hits == 1  # under way: waited for
    ahead.close()


def test_bounds_drop_the_oldest(engine: Engine, adapter_factory: Callable[[str, int], Path]) -> None:
    folders = [adapter_factory("seq_bn", 910 + i) for i in range(3)]
    ahead = ReadAhead(lambda f: engine.model.read_adapter_files(str(f)), limit_entries=2)
    ahead.want(folders)
    assert list(ahead._entries) == folders[1:]
    one = sum(t.numel() * t.element_size() for t in engine.model.read_adapter_files(str(folders[0])).state.values())
    by_bytes = ReadAhead(lambda f: engine.model.read_adapter_files(str(f)), limit_bytes=one + one // 2)
    for folder in folders:
        by_bytes.want([folder])
        by_bytes._entries[folder].future.result()
    assert list(by_bytes._entries) == folders[2:]  # two finished reads are more bytes than the bound
    ahead.close()
    by_bytes.close()


def test_engine_loads_read_ahead_files_with_the_same_results(engine: Engine, adapter_factory: Callable[[str, int], Path]) -> None:
    folders = {f"r{i}": adapter_factory(config, 920 + i) for i, config in enumerate(CONFIGS)}
    rows = engine.tokenize(["read ahead of time", "a second input"])
    plain = {}
    for name, folder in folders.items():
        assert engine.load(folder, name).read_ahead is False
        plain[name] = engine.embed([Segment(name, rows)])[0]
        engine.unload(name)
    engine.read_ahead(list(folders.values()))
    for folder in folders.values():  # as a forward pass would last: a read not begun yet is not waited for
        engine._ahead._entries[folder].future.result(30)
    for name, folder in folders.items():
        loaded = engine.load(folder, name)
        assert loaded.read_ahead is True and loaded.nbytes == engine.model.adapter_nbytes(name)
    for name in folders:
        np.testing.assert_array_equal(engine.embed([Segment(name, rows)])[0], plain[name])
        engine.unload(name)


def _meta(store: AdapterStore, engine: Engine, name: str, folder: Path) -> VersionMeta:
    staged = store.staging_dir()
    for f in folder.iterdir():
        (staged / f.name).write_bytes(f.read_bytes())
    return store.commit("t", name, staged, engine.inspect(staged), "u")


def _job(meta: VersionMeta, rows: list[list[int]]) -> Job:
    resolved = Resolved(block=meta.internal, metas=(meta,), head=None, solo=False)
    return Job(rows=rows, group="embedding", payload=Work(resolved, "embedding"), deadline=float("inf"))


def test_runner_reads_queued_requests_adapters_during_a_batch(tmp_path: Path, engine: Engine,
                                                              adapter_factory: Callable[[str, int], Path]) -> None:
    store = AdapterStore(tmp_path / "store")
    first, second = (_meta(store, engine, f"q{i}", adapter_factory("lora", 930 + i)) for i in range(2))
    metrics = Metrics()
    residency = Residency(engine, 1 << 30, metrics, lambda m: store.version_dir(m.tenant, m.name, m.version))
    wanted: list[list[Path]] = []
    inner = engine.read_ahead
    engine.read_ahead = lambda folders: wanted.append(list(folders)) or inner(folders)  # type: ignore[method-assign]
    try:
        run = make_runner(engine, residency)
        rows = engine.tokenize(["queued while a batch runs"])
        residency.hold([first])
        residency.hold([second])  # a request for `second` waits behind the batch of `first`
        [out1] = run([_job(first, rows)])
        assert wanted[-1] == [store.version_dir("t", "q1", 1)]
        engine._ahead._entries[wanted[-1][0]].future.result(30)  # a real batch runs long enough for the read
        residency.release([first])
        [out2] = run([_job(second, rows)])
        residency.release([second])
    finally:
        del engine.read_ahead
    hit = metrics.adapter_read_ahead.labels(result="hit")._value.get()
    miss = metrics.adapter_read_ahead.labels(result="miss")._value.get()
    assert (hit, miss) == (1, 1)  # the first load read on the inference thread, the second took the side read
    assert not isinstance(out1, Exception) and not isinstance(out2, Exception)
    engine.unload(first.internal)
    engine.unload(second.internal)


def _load_read_ahead(worker: WorkerEngine, folder: Path, name: str) -> bool:
    """Hint, give the child's reader a moment (a load cancels a read not begun), load; retried a few times on a
    busy machine. True when a load took the files the side thread read."""
    for attempt in range(20):
        worker.read_ahead([folder])
        time.sleep(0.02 * (attempt + 1))
        if worker.load(folder, name).read_ahead:
            return True
        worker.unload(name)
    return False


def test_worker_reads_ahead_and_unloads_without_an_answer(tiny_model_dir: Path, adapter_factory: Callable[[str, int], Path]) -> None:
    """The one-way messages (read ahead, unload) leave the socket in step: the next calls get their own answers
    and find what those messages did."""
    folders = [adapter_factory("seq_bn", 940), adapter_factory("lora", 941)]
    worker = WorkerEngine(str(tiny_model_dir), device="cpu")
    local = Engine(str(tiny_model_dir), device="cpu")
    try:
        rows = local.tokenize(["across the socket"])
        worker.read_ahead([])
        assert _load_read_ahead(worker, folders[0], "w0")
        assert _load_read_ahead(worker, folders[1], "w1")
        got = worker.embed([Segment("w0", rows), Segment("w1", rows)])
        for i, folder in enumerate(folders):
            local.load(folder, f"w{i}")
        want = np.concatenate(local.embed([Segment("w0", rows), Segment("w1", rows)]))
        np.testing.assert_allclose(np.concatenate(got), want, atol=1e-6)  # two processes may run other thread counts
        assert worker.load(folders[0], "w2").read_ahead is False  # taken already: read on the worker's main thread
        worker.unload("w1")  # not answered either, but in order: the next calls see it gone
        worker.load(folders[1], "w1")
        worker.unload("w1")
        with pytest.raises(ValueError, match="w1"):
            worker.embed([Segment("w1", rows)])
        with pytest.raises(ValueError, match="no adapter named 'w1'"):  # checked in this process
            worker.unload("w1")
    finally:
        worker.close()
        local.close()
