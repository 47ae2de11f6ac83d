"""Store, intake and safetensors checks (no model)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from server.errors import UploadRejected
from server.registry.archives import extract_archive
from server.registry.intake import ByteBudget, accepted_name
from server.registry.safetensors_check import read_safetensors_shapes
from server.registry.store import AdapterStore, Upload

UP = Upload(method="seq_bn", methods=("bottleneck",), has_head=False, nbytes=123)


def _stage(store: AdapterStore, payload: bytes = b"x") -> Path:
    d = store.staging_dir()
    (d / "adapter_config.json").write_text(json.dumps({"config": {}}))
    (d / "adapter.safetensors").write_bytes(payload)
    return d


def test_commit_versions_and_meta(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    m1 = store.commit("acme", "sent", _stage(store, b"one"), UP, "acme:k")
    m2 = store.commit("acme", "sent", _stage(store, b"two"), UP, "acme:k")
    assert (m1.version, m2.version) == (1, 2)
    assert store.latest("acme", "sent") == m2
    assert m1.sha256 != m2.sha256 and m1.internal != m2.internal
    meta = json.loads((tmp_path / "acme" / "sent" / "2" / "meta.json").read_text())
    assert meta["files"]["adapter.safetensors"]["size"] == 3 and meta["sha256"] == m2.sha256
    assert not list((tmp_path / ".tmp").iterdir())
    # a new process sees the same thing
    again = AdapterStore(tmp_path)
    assert [m.sha256 for m in again.list("acme")] == [m2.sha256]
    assert again.versions("acme", "sent") == [1, 2]


def test_fusions_lists_each_fusion_and_follows_new_names_and_versions(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    for name in ("a", "b", "c"):
        store.commit("t", name, _stage(store), UP, "u")

    def fusion(*names: str) -> Upload:
        return Upload("fusion", ("fusion",), False, 1, extra={"fuses": [{"name": n} for n in names]})

    assert store.fusions("t") == [] and store.fusions("nobody") == []
    store.commit("t", "f1", _stage(store), fusion("a", "b"), "u")
    assert [m.name for m in store.fusions("t")] == ["f1"]  # a new name: the cached listing is re-read
    store.commit("t", "f1", _stage(store, b"y"), fusion("a", "c"), "u")
    assert [(m.version, [f["name"] for f in m.fused]) for m in store.fusions("t")] == [(2, ["a", "c"])]
    store.commit("t", "f2", _stage(store), fusion("b", "c"), "u")
    store.delete("t", "f1")
    assert [m.name for m in store.fusions("t")] == ["f2"]


def test_torn_write_is_invisible_and_cleaned(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.commit("acme", "a", _stage(store), UP, "u")
    torn = _stage(store)  # a crash before the rename: only the staging dir exists
    assert torn.exists() and store.versions("acme", "a") == [1]
    os.utime(torn, (0, 0))
    AdapterStore(tmp_path)  # startup cleanup removes stale staging dirs
    assert not torn.exists()


def test_delete_moves_to_trash(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.commit("acme", "a", _stage(store), UP, "u")
    trash = store.delete("acme", "a")
    assert trash is not None and (trash / "1" / "meta.json").exists()
    assert store.latest("acme", "a") is None and store.list("acme") == []
    assert store.delete("acme", "a") is None


def test_names_are_checked(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    assert store.latest("acme", "../etc") is None
    with pytest.raises(ValueError):
        store.commit("acme", "../x", _stage(store), UP, "u")


def test_safetensors_checks(tmp_path: Path) -> None:
    good = tmp_path / "g.safetensors"
    save_file({"w": torch.zeros(2, 3)}, str(good))
    assert read_safetensors_shapes(good) == {"w": (2, 3)}
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ValueError, match="not JSON"):
        read_safetensors_shapes(bad)
    short = tmp_path / "s.safetensors"
    short.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(ValueError):
        read_safetensors_shapes(short)


def test_accepted_names() -> None:
    assert accepted_name("adapter.safetensors") == "adapter.safetensors"
    assert accepted_name("README.md") is None
    with pytest.raises(UploadRejected) as e:
        accepted_name("pytorch_adapter.bin")
    assert e.value.status == 415
    with pytest.raises(UploadRejected):
        accepted_name("evil.py")


def _tar(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize(
    "members,links,match",
    [
        ({"../adapter_config.json": b"{}"}, None, "outside"),
        ({"/etc/adapter_config.json": b"{}"}, None, "absolute"),
        ({"adapter_config.json": b"{}"}, {"adapter.safetensors": "/etc/passwd"}, "link"),
        ({"a/adapter_config.json": b"{}", "b/adapter.safetensors": b"x"}, None, "one adapter folder"),
    ],
)
def test_unsafe_tar_rejected(tmp_path: Path, members: dict[str, bytes], links: dict[str, str] | None, match: str) -> None:
    arc = tmp_path / "a.tar.gz"
    arc.write_bytes(_tar(members, links))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UploadRejected, match=match):
        extract_archive(arc, "a.tar.gz", dest, ByteBudget(1 << 20))
    assert not list(dest.iterdir())


def test_tar_and_zip_with_top_folder(tmp_path: Path) -> None:
    arc = tmp_path / "a.tar.gz"
    arc.write_bytes(_tar({"sent/adapter_config.json": b"{}", "sent/adapter.safetensors": b"x"}))
    dest = tmp_path / "t"
    dest.mkdir()
    extract_archive(arc, "a.tar.gz", dest, ByteBudget(1 << 20))
    assert sorted(p.name for p in dest.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("adapter_config.json", "{}")
        zf.writestr("../adapter.safetensors", "x")
    dest2 = tmp_path / "z"
    dest2.mkdir()
    with pytest.raises(UploadRejected, match="outside"):
        extract_archive(z, "a.zip", dest2, ByteBudget(1 << 20))


def test_archive_bomb_hits_budget(tmp_path: Path) -> None:
    arc = tmp_path / "a.tar.gz"
    arc.write_bytes(_tar({"adapter_config.json": b"{}", "adapter.safetensors": b"\0" * 200_000}))
    dest = tmp_path / "o"
    dest.mkdir()
    with pytest.raises(UploadRejected) as e:
        extract_archive(arc, "a.tar.gz", dest, ByteBudget(100_000))
    assert e.value.status == 413


def test_fast_json_round_trips_float32() -> None:
    import json as _json

    import numpy as np

    from server.http.jsonfmt import encode

    rng = np.random.default_rng(0)
    arr = rng.standard_normal((3, 384)).astype(np.float32) * np.float32(1e-3)
    body = _json.loads(encode({"data": [{"embedding": row, "i": i, "s": "x\"y"} for i, row in enumerate(arr)], "ok": True}))
    back = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert np.array_equal(back, arr) and body["data"][1]["i"] == 1 and body["data"][0]["s"] == 'x"y'
    with pytest.raises(ValueError):
        encode(np.array([np.nan], dtype=np.float32))
    with pytest.raises(ValueError):
        encode({"results": [{"score": float("inf")}]})
    strided = arr.T[:5]  # a non-contiguous view: written like its contiguous copy
    assert _json.loads(encode({"e": strided}))["e"] == _json.loads(encode({"e": np.ascontiguousarray(strided)}))["e"]
