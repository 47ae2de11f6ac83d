"""AdapterFusion over HTTP: upload a fusion over stored adapters, run {"fuse": [...]}, versions, bad uploads."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from server.metrics import LOAD_METHODS
from tests.server.conftest import (
    SENTENCES,
    Reference,
    Running,
    make_fusion,
    serve,
    settings_for,
    store_snapshot,
    upload_files,
)

pytestmark = pytest.mark.slow
KEY = "acme-key"


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    store = tmp_path_factory.mktemp("store")
    with serve(settings_for(tiny_model_dir, store, api_keys_file=keys_file, max_batch_size=64, max_wait_ms=30)) as running:
        yield running


@pytest.fixture(scope="module")
def fused(tiny_model_dir: Path, adapter_factory: Callable[[str, int], Path], tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[dict[str, Path], Path]:
    """Two seq_bn adapters (fa, fb) and a fusion over them, made by the library under those names."""
    folders = {"fa": adapter_factory("seq_bn", 501), "fb": adapter_factory("seq_bn", 502)}
    return folders, make_fusion(tiny_model_dir, folders, tmp_path_factory.mktemp("fusion") / "fab", seed=7)


def _emb(body: dict) -> np.ndarray:
    return np.array([r["embedding"] for r in body["results"]], dtype=np.float32)


def _infer(c, adapters: object, texts: list[str] = SENTENCES[:3]):  # noqa: ANN001, ANN202
    return c.post("/v1/infer", json={"inputs": texts, "adapters": adapters})


def test_fusion_upload_then_infer_equals_library(srv: Running, fused: tuple[dict[str, Path], Path], reference: Reference) -> None:
    folders, fusion = fused
    from adapters_core import Fuse

    want = reference.embed_composition(folders, Fuse("fa", "fb"), SENTENCES[:3], fusion=fusion)
    assert np.abs(want - reference.embed(folders["fa"], SENTENCES[:3])).max() > 1e-3  # the fusion matters
    with srv.client(KEY) as c:
        for name, folder in folders.items():
            assert upload_files(c, name, folder).status_code == 201
        r = upload_files(c, "fab", fusion)
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["method"] == "fusion" and body["methods"] == ["fusion"] and not body["has_head"]
        assert body["fuses"] == [{"name": "fa", "version": 1, "owner": "tenant"}, {"name": "fb", "version": 1, "owner": "tenant"}]
        assert body["nbytes"] > 0
        assert c.get("/v1/adapters/fab").json()["fuses"][1]["name"] == "fb"
        for spec in ({"fuse": ["fa", "fb"]}, {"fuse": ["fa", "fb"], "name": "fab"}):
            r = _infer(c, spec)
            assert r.status_code == 200, r.text
            assert np.abs(_emb(r.json()) - want).max() < 1e-5
            assert {a["name"] for a in r.json()["adapters"]} == {"fa", "fb", "fab"}

    def call(spec: object, text: str) -> np.ndarray:
        with srv.client(KEY) as c:
            r = _infer(c, spec, [text])
            assert r.status_code == 200, r.text
            return _emb(r.json())[0]

    jobs = [({"fuse": ["fa", "fb"]}, s) for s in SENTENCES] + [("fa", s) for s in SENTENCES]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:  # fused and plain rows share forward passes
        got = list(pool.map(lambda j: call(*j), jobs))
    fuse_want = reference.embed_composition(folders, Fuse("fa", "fb"), SENTENCES, fusion=fusion)
    plain_want = reference.embed(folders["fa"], SENTENCES)
    assert np.abs(np.stack(got[: len(SENTENCES)]) - fuse_want).max() < 1e-5
    assert np.abs(np.stack(got[len(SENTENCES):]) - plain_want).max() < 1e-5


def test_fusion_keeps_the_adapter_versions_it_was_made_for(
    srv: Running, tiny_model_dir: Path, adapter_factory: Callable[[str, int], Path], reference: Reference, tmp_path: Path,
) -> None:
    folders = {"va": adapter_factory("seq_bn", 511), "vb": adapter_factory("seq_bn", 512)}
    fusion = make_fusion(tiny_model_dir, folders, tmp_path / "vab", seed=8)
    newer = adapter_factory("seq_bn", 513)
    with srv.client(KEY) as c:
        for name, folder in folders.items():
            assert upload_files(c, name, folder).status_code == 201
        assert upload_files(c, "vab", fusion).status_code == 201
        before = _emb(_infer(c, {"fuse": ["va", "vb"]}).json())
        assert upload_files(c, "va", newer).status_code == 201  # version 2 of va
        r = _infer(c, {"fuse": ["va", "vb"]})
        assert r.status_code == 200, r.text
        assert np.array_equal(_emb(r.json()), before)  # the fusion still runs va version 1
        assert np.abs(_emb(_infer(c, "va").json()) - reference.embed(newer, SENTENCES[:3])).max() < 1e-5
        assert c.delete("/v1/adapters/va").status_code == 200
        r = _infer(c, {"fuse": ["va", "vb"], "name": "vab"})
        assert r.status_code == 404 and "va" in r.json()["detail"], r.text  # va itself is gone
        assert upload_files(c, "va", newer).status_code == 201  # a new va, but not the version the fusion was made for
        r = _infer(c, {"fuse": ["va", "vb"]})
        assert r.status_code == 422 and r.json()["type"].endswith("stale-fusion") and "upload the fusion again" in r.json()["detail"]


def test_bad_fusion_uploads_and_uses(
    srv: Running, tiny_model_dir: Path, adapter_factory: Callable[[str, int], Path], tmp_path: Path,
) -> None:
    folders = {"ba": adapter_factory("seq_bn", 521), "bb": adapter_factory("seq_bn", 522)}
    fusion = make_fusion(tiny_model_dir, folders, tmp_path / "good", seed=9)
    with srv.client(KEY) as c:
        for name, folder in folders.items():
            assert upload_files(c, name, folder).status_code == 201
        assert upload_files(c, "bl", adapter_factory("lora", 523)).status_code == 201
        root = Path(srv.settings.store_dir)
        snapshot = store_snapshot(root)

        def bad(name: str, folder: Path, status: int, *words: str) -> None:
            r = upload_files(c, name, folder)
            assert r.status_code == status, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert all(w in r.json()["detail"] for w in words), r.text
            assert store_snapshot(root) == snapshot

        unknown = make_fusion(tiny_model_dir, {"ba": folders["ba"], "nope": folders["bb"]}, tmp_path / "unknown", seed=9)
        bad("f1", unknown, 422, "'nope'", "upload it first")
        over_lora = make_fusion(tiny_model_dir, {"ba": folders["ba"], "bl": adapter_factory("seq_bn", 523)}, tmp_path / "lora", seed=9)
        bad("f2", over_lora, 422, "'bl'", "bottleneck adapters only")
        assert upload_files(c, "bd", adapter_factory("double_seq_bn", 524)).status_code == 201
        snapshot = store_snapshot(root)
        over_double = make_fusion(tiny_model_dir, {"ba": folders["ba"], "bd": adapter_factory("seq_bn", 524)},
                                  tmp_path / "double", seed=9)  # made over a seq_bn "bd"; the server's is double_seq_bn
        bad("f8", over_double, 422, "do not sit at the same locations", "mh_adapter location holds 'bd' but not 'ba'")
        renamed = tmp_path / "renamed"
        renamed.mkdir()
        state = load_file(str(fusion / "model_adapter_fusion.safetensors"))
        key = next(k for k in state if ".query." in k)
        state[key.replace(".query.", ".quarry.")] = state.pop(key)
        save_file(state, str(renamed / "model_adapter_fusion.safetensors"))
        (renamed / "adapter_fusion_config.json").write_bytes((fusion / "adapter_fusion_config.json").read_bytes())
        bad("f3", renamed, 422, "does not fit", "quarry")
        wide = tmp_path / "wide"
        wide.mkdir()
        config = json.loads((fusion / "adapter_fusion_config.json").read_text())
        (wide / "adapter_fusion_config.json").write_text(json.dumps({**config, "hidden_size": 64}))
        (wide / "model_adapter_fusion.safetensors").write_bytes((fusion / "model_adapter_fusion.safetensors").read_bytes())
        bad("f4", wide, 422, "hidden_size 64")
        mixed = tmp_path / "mixed"
        mixed.mkdir()
        for f in (*fusion.iterdir(), *folders["ba"].iterdir()):
            (mixed / f.name).write_bytes(f.read_bytes())
        bad("f5", mixed, 422, "adapter_config.json")
        lonely = tmp_path / "lonely"
        lonely.mkdir()
        (lonely / "adapter_fusion_config.json").write_bytes((fusion / "adapter_fusion_config.json").read_bytes())
        bad("f6", lonely, 422, "model_adapter_fusion.safetensors")
        pickled = tmp_path / "pickled"  # AdapterHub's older fusion weights file is a pickle: never unpickled
        pickled.mkdir()
        (pickled / "adapter_fusion_config.json").write_bytes((fusion / "adapter_fusion_config.json").read_bytes())
        (pickled / "pytorch_model_adapter_fusion.bin").write_bytes(b"\x80\x04not really")
        bad("f7", pickled, 415, "pickle", "model_adapter_fusion.safetensors")

        r = _infer(c, {"fuse": ["ba", "bb"]})  # no fusion uploaded over them
        assert r.status_code == 422 and "no AdapterFusion over ['ba', 'bb']" in r.json()["detail"], r.text
        assert upload_files(c, "fgood", fusion).status_code == 201
        r = _infer(c, "fgood")
        assert r.status_code == 422 and "is an AdapterFusion" in r.json()["detail"] and '"name": "fgood"' in r.json()["detail"], r.text
        r = c.post("/v1/embeddings", json={"model": "fgood", "input": "fun"})
        assert r.status_code == 422 and "is an AdapterFusion" in r.json()["detail"], r.text
        assert "fgood" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
        snapshot = store_snapshot(root)
        bad("ba", fusion, 422, "'ba' is an adapter", "cannot be an AdapterFusion")  # no kind change across versions
        bad("fgood", folders["ba"], 422, "'fgood' is an AdapterFusion")
        r = _infer(c, {"fuse": ["bb", "ba"], "name": "fgood"})
        assert r.status_code == 422 and "fuses ['ba', 'bb']" in r.json()["detail"], r.text
        r = _infer(c, {"fuse": ["ba", "bb"], "name": "bl"})
        assert r.status_code == 422 and "not an AdapterFusion" in r.json()["detail"], r.text
    with srv.client("beta-key") as other:  # another tenant sees neither the fusion nor its adapters
        assert _infer(other, {"fuse": ["ba", "bb"], "name": "fgood"}).status_code == 404


def test_fusion_survives_eviction_and_a_worker_restart(
    tiny_model_dir: Path, adapter_factory: Callable[[str, int], Path], reference: Reference, tmp_path: Path,
) -> None:
    """A cache that holds the two fused adapters and their fusion, plus half an adapter: another adapter evicts
    the least recently used fused one (the model drops the fusion with it), and the fusion loads again when
    used; a killed worker comes back with the fusion."""
    from adapters_core import AutoAdapterModel, Fuse

    folders = {"ea": adapter_factory("seq_bn", 531), "eb": adapter_factory("seq_bn", 532)}
    fusion = make_fusion(tiny_model_dir, folders, tmp_path / "eab", seed=10)
    want = reference.embed_composition(folders, Fuse("ea", "eb"), SENTENCES[:3], fusion=fusion)
    sizing = AutoAdapterModel.from_pretrained(str(tiny_model_dir))
    for name, folder in folders.items():
        sizing.load_adapter(str(folder), load_as=name)
    one = sizing.adapter_nbytes("ea")
    budget = 2 * one + sizing.fusion_nbytes(sizing.load_adapter_fusion(str(fusion))) + one // 2
    settings = settings_for(tiny_model_dir, tmp_path / "store", inference_worker=True, adapter_cache_mb=budget / 2**20)
    with serve(settings) as srv, srv.client() as c:
        for name, folder in {**folders, "x1": adapter_factory("seq_bn", 533)}.items():
            assert upload_files(c, name, folder).status_code == 201
        assert upload_files(c, "eab", fusion).status_code == 201
        rt = srv.app.state.runtime
        fusion_internal = rt.store.latest("default", "eab").internal
        for round_ in range(2):
            r = _infer(c, {"fuse": ["ea", "eb"]})
            assert r.status_code == 200, r.text
            assert np.abs(_emb(r.json()) - want).max() < 1e-5, round_
            assert rt.residency.is_resident(fusion_internal)
            assert _infer(c, "x1").status_code == 200
            assert not rt.residency.is_resident(fusion_internal)  # evicted with ea
        assert _infer(c, {"fuse": ["ea", "eb"]}).status_code == 200
        loads = sum(rt.metrics.adapter_loads.labels(result="ok", method=m)._value.get() for m in LOAD_METHODS)
        old = rt.engine.pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while rt.engine.alive:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = _infer(c, {"fuse": ["ea", "eb"]})  # residency still counts the fusion loaded: the new worker has it
        assert r.status_code == 200, r.text
        assert np.abs(_emb(r.json()) - want).max() < 1e-5
        assert rt.engine.pid not in (None, old)
        assert sum(rt.metrics.adapter_loads.labels(result="ok", method=m)._value.get() for m in LOAD_METHODS) == loads  # the worker's replay, no reload
