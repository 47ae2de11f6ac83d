"""Residency: byte budget, LRU, pins, deferred unload after delete (fake loader, no model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import AdapterUnavailable
from server.execution.residency import Loaded, Residency
from server.metrics import Metrics
from server.registry.store import AdapterStore, Upload, VersionMeta


class FakeLoader:
    """Keeps the model-side rules residency relies on: a fusion loads only over loaded adapters, and
    unloading an adapter unloads the fusions over it."""

    def __init__(self) -> None:
        self.loaded: dict[str, int] = {}
        self.fusions: dict[str, tuple[str, ...]] = {}
        self.log: list[str] = []

    def load(self, path: Path, internal: str, fuses: tuple[str, ...] = ()) -> Loaded:
        assert path.is_dir()
        assert all(f in self.loaded for f in fuses), "a fusion needs its adapters loaded first"
        self.loaded[internal] = 100
        if fuses:
            self.fusions[internal] = fuses
        self.log.append("load " + internal)
        return Loaded(100)

    def unload(self, internal: str) -> None:
        del self.loaded[internal]
        self.fusions.pop(internal, None)
        for fusion in [f for f, members in self.fusions.items() if internal in members]:
            del self.loaded[fusion], self.fusions[fusion]
        self.log.append("unload " + internal)


def _metas(tmp_path: Path, n: int) -> tuple[AdapterStore, list[VersionMeta]]:
    store = AdapterStore(tmp_path)
    metas = []
    for i in range(n):
        d = store.staging_dir()
        (d / "adapter.safetensors").write_bytes(bytes([i]))
        metas.append(store.commit("t", f"a{i}", d, Upload("lora", ("lora",), False, 100), "u"))
    return store, metas


def _residency(store: AdapterStore, budget: int) -> tuple[Residency, FakeLoader, Metrics]:
    loader, metrics = FakeLoader(), Metrics()
    res = Residency(loader, budget, metrics, lambda m: store.version_dir(m.tenant, m.name, m.version))
    return res, loader, metrics


def test_lru_eviction_within_budget(tmp_path: Path) -> None:
    store, m = _metas(tmp_path, 4)
    res, loader, metrics = _residency(store, 250)
    for meta in (m[0], m[1], m[0], m[2]):  # a1 is least recently used when a2 arrives
        res.prepare([meta])
        res.unpin_metas([meta])
    assert set(loader.loaded) == {m[0].internal, m[2].internal}
    assert metrics.adapters_resident._value.get() == 2
    assert metrics.adapter_cache_bytes._value.get() == 200


def test_pinned_adapters_are_not_evicted(tmp_path: Path) -> None:
    store, m = _metas(tmp_path, 3)
    res, loader, _ = _residency(store, 150)
    res.prepare([m[0], m[1]])  # one batch needs both: over budget briefly, nothing pinned is evicted
    assert set(loader.loaded) == {m[0].internal, m[1].internal}
    res.unpin_metas([m[0], m[1]])
    res.prepare([m[2]])
    assert m[2].internal in loader.loaded and len(loader.loaded) == 1


def test_delete_waits_for_inflight(tmp_path: Path) -> None:
    store, m = _metas(tmp_path, 1)
    res, loader, _ = _residency(store, 1000)
    res.hold([m[0]])  # a queued request resolved this version
    trash = store.delete("t", "a0")
    assert trash is not None
    res.retire([m[0]], trash)
    res.prepare([m[0]])  # still loadable from the trash for the queued request
    res.unpin_metas([m[0]])
    assert trash.exists() and m[0].internal in loader.loaded
    res.release([m[0]])  # the request finished: unload pending, files go
    res.unload_pending()
    assert m[0].internal not in loader.loaded and not trash.exists()


def test_delete_without_inflight_is_immediate(tmp_path: Path) -> None:
    store, m = _metas(tmp_path, 1)
    res, loader, _ = _residency(store, 1000)
    trash = store.delete("t", "a0")
    assert trash is not None
    res.retire([m[0]], trash)
    assert not trash.exists()
    with pytest.raises(AdapterUnavailable):
        res.prepare([m[0]])


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    store, m = _metas(tmp_path, 1)
    res, loader, metrics = _residency(store, 1000)
    (store.version_dir("t", "a0", 1) / "adapter.safetensors").write_bytes(b"tampered")
    with pytest.raises(AdapterUnavailable, match="sha256"):
        res.prepare([m[0]])
    assert not loader.loaded


def test_reloads_hash_only_files_that_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.execution import residency as residency_module

    store, m = _metas(tmp_path, 2)
    res, loader, _ = _residency(store, 150)  # room for one: each prepare evicts the other
    hashed: list[str] = []
    real = residency_module.file_sha256
    monkeypatch.setattr(residency_module, "file_sha256", lambda p: hashed.append(p.parent.parent.name) or real(p))
    for meta in (m[0], m[1], m[0], m[1]):
        res.prepare([meta])
        res.unpin_metas([meta])
    assert hashed == ["a0", "a1"], "the checksum is read at a version's first load only"
    assert loader.log.count("load " + m[0].internal) == 2
    (store.version_dir("t", "a0", 1) / "adapter.safetensors").write_bytes(b"rewritten later")
    with pytest.raises(AdapterUnavailable, match="sha256"):
        res.prepare([m[0]])  # its size and mtime changed: hashed again, and refused


def test_evicting_a_fused_adapter_forgets_its_fusion(tmp_path: Path) -> None:
    store, m = _metas(tmp_path, 3)
    d = store.staging_dir()
    (d / "model_adapter_fusion.safetensors").write_bytes(b"f")
    fuses = [{"tenant": x.tenant, "name": x.name, "version": x.version, "internal": x.internal} for x in m[:2]]
    fusion = store.commit("t", "f", d, Upload("fusion", ("fusion",), False, 100, extra={"fuses": fuses}), "u")
    assert fusion.fused_internals == (m[0].internal, m[1].internal)
    res, loader, _ = _residency(store, 300)
    res.prepare([m[0], m[1], fusion])
    assert loader.fusions == {fusion.internal: fusion.fused_internals}
    res.unpin_metas([m[0], m[1], fusion])
    res.prepare([m[2]])  # over budget: a0 (least recently used) goes, and the model drops the fusion with it
    res.unpin_metas([m[2]])
    assert fusion.internal not in loader.loaded and not res.is_resident(fusion.internal)
    res.prepare([m[0], m[1], fusion])  # used again: the adapter and then the fusion load again
    assert res.is_resident(fusion.internal) and loader.fusions == {fusion.internal: fusion.fused_internals}


def test_trash_is_removed_outside_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removing a deleted adapter's files (slow on an RWX/NFS volume) never holds the lock the inference thread
    takes: on retire with nothing in flight, on the last release, and on the deferred unload."""
    import server.execution.residency as residency_module

    store, m = _metas(tmp_path, 3)
    res, loader, _ = _residency(store, 1000)
    removed: list[tuple[Path, bool]] = []
    real_rmtree = residency_module.shutil.rmtree

    def recording_rmtree(path: Path, *args: object, **kwargs: object) -> None:
        removed.append((Path(path), res._lock.locked()))
        real_rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(residency_module.shutil, "rmtree", recording_rmtree)
    trash0 = store.delete("t", "a0")  # nothing in flight: removed at once
    assert trash0 is not None
    res.retire([m[0]], trash0)
    res.hold([m[1]])  # in flight, not resident: removed when the request is released
    trash1 = store.delete("t", "a1")
    assert trash1 is not None
    res.retire([m[1]], trash1)
    res.release([m[1]])
    res.prepare([m[2]])  # resident: unloaded by the inference thread, then removed
    res.unpin_metas([m[2]])
    trash2 = store.delete("t", "a2")
    assert trash2 is not None
    res.retire([m[2]], trash2)
    res.unload_pending()
    assert {p for p, _ in removed} == {trash0, trash1, trash2}
    assert not any(locked for _, locked in removed), removed
    assert not any(p.exists() for p in (trash0, trash1, trash2)) and not loader.loaded


def test_upcoming_names_what_requests_hold_and_the_model_lacks(tmp_path: Path) -> None:
    store, m = _metas(tmp_path, 4)
    res, loader, metrics = _residency(store, 1000)
    res.prepare([m[0]])
    res.unpin_metas([m[0]])
    res.hold([m[2]])
    res.hold([m[0], m[1]])  # m0 is resident: nothing to read
    res.hold([m[2]])
    assert res.upcoming() == [store.version_dir("t", "a2", 1), store.version_dir("t", "a1", 1)]  # first asked first
    assert res.upcoming(limit=1) == [store.version_dir("t", "a2", 1)]
    res.prepare([m[1]])
    res.unpin_metas([m[1]])
    assert res.upcoming() == [store.version_dir("t", "a2", 1)]
    res.release([m[2]])
    assert res.upcoming() == [store.version_dir("t", "a2", 1)]  # one of its two requests is still queued
    res.release([m[2]])
    assert res.upcoming() == []
    assert metrics.adapter_read_ahead.labels(result="miss")._value.get() == 2  # the fake loader never reads ahead


def test_upcoming_follows_a_deleted_version_into_the_trash(tmp_path: Path) -> None:
    store, m = _metas(tmp_path, 1)
    res, _, _ = _residency(store, 1000)
    res.hold([m[0]])
    trash = store.delete("t", "a0")
    assert trash is not None
    res.retire([m[0]], trash)
    [folder] = res.upcoming()
    assert folder.is_relative_to(trash) and (folder / "adapter.safetensors").is_file()
