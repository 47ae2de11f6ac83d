"""Hostile uploads (issue 12): each gets a quick 4xx problem+json naming what is wrong, and the store stays as it was.

Every request here has a client timeout: a check that regresses into minutes of work fails instead of hanging.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import shutil
import tarfile
import threading
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from server.errors import UploadRejected
from server.registry.archives import extract_archive
from server.registry.intake import ByteBudget
from tests.server.conftest import Running, serve, settings_for, store_snapshot, upload_files

pytestmark = pytest.mark.slow

TIMEOUT = 30.0
ZEROS = bytes(16 << 20)


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    store = tmp_path_factory.mktemp("store-hostile")
    settings = settings_for(tiny_model_dir, store, api_keys_file=keys_file, max_upload_mb=4, max_inputs=8)
    with serve(settings) as running:
        yield running


@pytest.fixture(scope="module")
def good(srv: Running, adapter_factory: Callable[[str, int], Path]) -> Path:
    folder = adapter_factory("seq_bn", 7)
    with srv.client("acme-key") as c:
        assert upload_files(c, "good", folder).status_code == 201
    return folder


def _assert_problem(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    detail = r.json()["detail"]
    for needle in needles:
        assert needle.lower() in detail.lower(), detail


def _files(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]


def _archive(name: str, data: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("archive", (name, data, "application/octet-stream"))]


def _refused(srv: Running, files: list[Any], status: int, *needles: str, name: str = "hostile") -> None:
    """The upload is answered `status` with a detail holding every needle, and the store is unchanged."""
    before = store_snapshot(srv.settings.store_dir)
    with srv.client("acme-key", timeout=TIMEOUT) as c:
        _assert_problem(c.post("/v1/adapters", data={"name": name}, files=files), status, *needles)
    assert store_snapshot(srv.settings.store_dir) == before


# -- head configs ----------------------------------------------------------------------------------
def _with_head(folder: Path, out: Path, config: dict[str, Any], n_out: int = 2, layers: int = 2) -> Path:
    """`folder` plus an AdapterHub classification head whose head_config.json "config" is `config`."""
    shutil.copytree(folder, out)
    name = json.loads((folder / "adapter_config.json").read_text())["name"]
    (out / "head_config.json").write_text(json.dumps({"config": config, "hidden_size": 32, "model_class": "BertAdapterModel", "name": name}))
    gen = torch.Generator().manual_seed(3)
    state = {}
    for i in range(layers):
        rows = n_out if i == layers - 1 else 32
        state[f"heads.{name}.{3 * i + 1}.weight"] = torch.randn(rows, 32, generator=gen)
        state[f"heads.{name}.{3 * i + 1}.bias"] = torch.randn(rows, generator=gen)
    save_file(state, str(out / "model_head.safetensors"))
    return out


HEAD = {"head_type": "classification", "num_labels": 2, "layers": 2, "activation_function": "tanh",
        "label2id": {"neg": 0, "pos": 1}, "use_pooler": False, "bias": True, "dropout_prob": None}
HEAD_CASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "num_labels_1e8": ({**HEAD, "num_labels": 100_000_000, "label2id": None}, ("num_labels",)),
    "num_labels_negative": ({**HEAD, "num_labels": -5, "label2id": None}, ("num_labels",)),
    "num_labels_vs_weights": ({**HEAD, "num_labels": 3, "label2id": None}, ("num_labels", "3", "2")),
    "layers_1e5": ({**HEAD, "layers": 100_000}, ("layers",)),
    "layers_vs_weights": ({**HEAD, "layers": 3}, ("layers", "3", "2")),
    "label2id_list": ({**HEAD, "label2id": [1, 2]}, ("label2id", "object", "label -> id")),
    "label2id_vs_num_labels": ({**HEAD, "label2id": {"a": 0, "b": 1, "c": 2}}, ("labels", "num_labels")),
}


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_head_config_sizes_are_checked_before_the_head_is_built(srv: Running, good: Path, tmp_path: Path, case: str) -> None:
    config, needles = HEAD_CASES[case]
    _refused(srv, _files(_with_head(good, tmp_path / "head", config)), 422, "head_config.json", *needles)


def test_a_sane_head_still_uploads(srv: Running, good: Path, tmp_path: Path) -> None:
    with srv.client("acme-key", timeout=TIMEOUT) as c:
        r = upload_files(c, "headed", _with_head(good, tmp_path / "head", HEAD))
        assert r.status_code == 201, r.text
        assert r.json()["head"]["id2label"] == {"0": "neg", "1": "pos"}


# -- JSON, weights and config numbers --------------------------------------------------------------
def _safetensors_with_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


DEEP = {
    "header [": ("adapter.safetensors", b"[" * 100_000, "deep"),
    "config [": ("adapter_config.json", b"[" * 100_000, "deep"),
    "config objects": ("adapter_config.json", b'{"a":' * 5000 + b"1" + b"}" * 5000, "deep"),
    "config escaped quotes": ("adapter_config.json", b'"' + b'\\"' * 500_000, "not json"),  # a quadratic scan would hang
}


@pytest.mark.parametrize("case", sorted(DEEP))
def test_deeply_nested_json(srv: Running, good: Path, case: str) -> None:
    """Python's json recursed into a RecursionError (500) on the deep ones."""
    where, raw, needle = DEEP[case]
    files = {"adapter_config.json": (good / "adapter_config.json").read_bytes(), "adapter.safetensors": (good / "adapter.safetensors").read_bytes()}
    files[where] = _safetensors_with_header(raw) if where == "adapter.safetensors" else raw
    _refused(srv, [("files", (n, data, "application/octet-stream")) for n, data in files.items()], 422, where, needle)


@pytest.mark.parametrize("value,needles", [(float("nan"), ("finite",)), (float("inf"), ("finite",)), (1e30, ("magnitude", "1e+30"))])
def test_weights_must_be_finite_and_sane(srv: Running, good: Path, tmp_path: Path, value: float, needles: tuple[str, ...]) -> None:
    """Such weights were stored (201) and every later inference for the adapter answered 500."""
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    tensors = load_file(str(bad / "adapter.safetensors"))
    key = sorted(tensors)[-1]
    tensors[key] = torch.full_like(tensors[key], value)
    save_file(tensors, str(bad / "adapter.safetensors"))
    _refused(srv, _files(bad), 422, "adapter.safetensors", key, *needles)


@pytest.mark.parametrize("literal,needles", [("NaN", ("config.scaling", "finite")), ("1e999", ("config.scaling", "finite")),
                                             ("1e30", ("config.scaling", "within"))])
def test_config_numbers_must_be_finite_and_sane(srv: Running, good: Path, tmp_path: Path, literal: str, needles: tuple[str, ...]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    text = json.loads((bad / "adapter_config.json").read_text())
    text["config"]["scaling"] = "@@"
    (bad / "adapter_config.json").write_text(json.dumps(text).replace('"@@"', literal))
    _refused(srv, _files(bad), 422, "adapter_config.json", *needles)


# -- archives --------------------------------------------------------------------------------------
_COMPRESS = {
    "gz": lambda d: gzip.compress(d, 9),
    "bz2": lambda d: bz2.compress(d, 9),
    "xz": lambda d: lzma.compress(d, preset=0),
}


def _tar_bomb(kind: str, gib: int, member_type: bytes = tarfile.REGTYPE) -> bytes:
    """A tar whose first member claims `gib` GiB of zeros (and holds them), compressed as concatenated streams
    of 16 MiB of zeros each (gzip, bz2 and xz readers take concatenated streams), so it is quick to build."""
    info = tarfile.TarInfo("././@LongLink" if member_type == tarfile.GNUTYPE_LONGNAME else "adapter.safetensors")
    info.size, info.type = gib << 30, member_type
    compress = _COMPRESS[kind]
    return compress(info.tobuf(format=tarfile.GNU_FORMAT)) + compress(ZEROS) * (info.size // len(ZEROS))


def _zip_bomb(method: int, mib: int) -> bytes:
    """A zip whose one member inflates to `mib` MiB of zeros while its headers claim 1000 bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("adapter.safetensors")
        info.compress_type = method
        with zf.open(info, "w") as w:
            for _ in range(mib // 16):
                w.write(ZEROS)
    raw = bytearray(buf.getvalue())
    for signature, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):  # uncompressed size in both headers
        at = raw.index(signature) + offset
        raw[at:at + 4] = (1000).to_bytes(4, "little")
    return bytes(raw)


@pytest.mark.parametrize("kind,gib", [("gz", 4), ("bz2", 12), ("xz", 12)])
def test_tar_bomb_is_refused_from_its_header(srv: Running, good: Path, kind: str, gib: int) -> None:
    """Each bomb takes the old code 15-40 s of decompression before its 413; now the member's declared size
    is checked before a byte of it is read."""
    _refused(srv, _archive(f"a.tar.{kind}", _tar_bomb(kind, gib)), 413, "adapter.safetensors", "limit")


@pytest.mark.parametrize("kind", sorted(_COMPRESS))
def test_tar_bomb_in_a_long_name_header_stops_at_the_budget(srv: Running, good: Path, kind: str) -> None:
    """A GNU long-name header is read by tarfile itself, into memory: the budgeted stream cuts it off."""
    _refused(srv, _archive(f"a.tar.{kind}", _tar_bomb(kind, 1, tarfile.GNUTYPE_LONGNAME)), 413, "limit")


ZIP_METHODS = {"deflate": zipfile.ZIP_DEFLATED, "bzip2": zipfile.ZIP_BZIP2, "lzma": zipfile.ZIP_LZMA}


@pytest.mark.parametrize("method", sorted(ZIP_METHODS))
def test_zip_bomb_stops_at_the_budget(srv: Running, good: Path, method: str) -> None:
    _refused(srv, _archive("a.zip", _zip_bomb(ZIP_METHODS[method], 64)), 413, "limit")


@pytest.mark.parametrize("method", ["bzip2", "lzma"])
def test_zip_bomb_memory_stays_bounded(tmp_path: Path, method: str) -> None:
    """zipfile inflates a bzip2 or lzma read in one call (64 MiB at once here); members are inflated in
    bounded chunks instead, so the extraction's peak memory stays far below the bomb's size."""
    arc = tmp_path / "a.zip"
    arc.write_bytes(_zip_bomb(ZIP_METHODS[method], 64))
    dest = tmp_path / "out"
    dest.mkdir()
    tracemalloc.start()
    try:
        with pytest.raises(UploadRejected, match="limit"):
            extract_archive(arc, "a.zip", dest, ByteBudget(4 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert not list(dest.iterdir())


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def test_archive_with_a_file_twice(srv: Running, good: Path) -> None:
    files = sorted((p.name, p.read_bytes()) for p in good.iterdir())
    twice = [*files, ("adapter_config.json", (good / "adapter_config.json").read_bytes())]
    with pytest.warns(UserWarning, match="Duplicate name"):
        zipped = _zip(twice)
    _refused(srv, _archive("a.tar.gz", _tar(twice)), 422, "adapter_config.json", "twice")
    _refused(srv, _archive("a.zip", zipped), 422, "adapter_config.json", "twice")


# -- quota -----------------------------------------------------------------------------------------
def test_quota_holds_under_concurrent_uploads(tiny_model_dir: Path, keys_file: Path, tmp_path: Path, good: Path) -> None:
    """With 3 adapters allowed, 24 concurrent uploads of different names store exactly 3 (it was 4 in 2 of
    4 trials); two tenants, one round each."""
    settings = settings_for(tiny_model_dir, tmp_path / "store", api_keys_file=keys_file, tenant_max_adapters=3)
    files = _files(good)
    with serve(settings) as running:
        for key, tenant in (("acme-key", "acme"), ("beta-key", "beta")):
            start = threading.Barrier(24)
            codes: list[int] = []

            def upload(i: int, key: str = key, start: threading.Barrier = start, codes: list[int] = codes) -> None:
                with running.client(key, timeout=TIMEOUT) as c:
                    start.wait()
                    r = c.post("/v1/adapters", data={"name": f"q{i}"}, files=files)
                    assert r.status_code in (201, 403), r.text
                    assert r.status_code == 201 or "quota" in r.json()["detail"]
                    codes.append(r.status_code)

            threads = [threading.Thread(target=upload, args=(i,)) for i in range(24)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(codes) == [201] * 3 + [403] * 21, (tenant, codes)
            stored = [p.name for p in (settings.store_dir / tenant).iterdir() if p.is_dir() and any(p.iterdir())]
            assert len(stored) == 3, (tenant, stored)


# -- chunked bodies --------------------------------------------------------------------------------
def _chunked(total: int, head: bytes = b"", tail: bytes = b"") -> Iterator[bytes]:
    yield head
    for _ in range(total // 65536):
        yield b"a" * 65536
    yield tail


def test_chunked_bodies_over_the_limit_are_413(srv: Running, good: Path) -> None:
    """Without a Content-Length the limit is found while reading; JSON bodies got FastAPI's generic 400."""
    with srv.client("acme-key", timeout=TIMEOUT) as c:
        body = _chunked(10 << 20, b'{"inputs": ["', b'"], "adapters": "good"}')
        r = c.post("/v1/infer", content=body, headers={"content-type": "application/json"})
        _assert_problem(r, 413, "limit")
        part = b'--xx\r\nContent-Disposition: form-data; name="files"; filename="adapter.safetensors"\r\n\r\n'
        r = c.post("/v1/adapters", content=_chunked(10 << 20, part, b"\r\n--xx--\r\n"),
                   headers={"content-type": "multipart/form-data; boundary=xx"})
        _assert_problem(r, 413, "limit")
        assert c.post("/v1/infer", json={"inputs": ["fun"], "adapters": "good"}).status_code == 200


# -- what an upload reports ------------------------------------------------------------------------
def test_unknown_config_keys_are_reported(srv: Running, good: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    shutil.copytree(good, extra)
    config = json.loads((extra / "adapter_config.json").read_text())
    config["config"]["my_custom_knob"] = 3
    (extra / "adapter_config.json").write_text(json.dumps(config))
    with srv.client("acme-key", timeout=TIMEOUT) as c:
        r = upload_files(c, "knobbed", extra)
        assert r.status_code == 201, r.text
        assert any("my_custom_knob" in w for w in r.json()["warnings"]), r.json()
        assert any("my_custom_knob" in w for w in c.get("/v1/adapters/knobbed").json()["warnings"])
        assert upload_files(c, "plain", good).json()["warnings"] == []
        schema = c.get("/openapi.json").json()["components"]["schemas"]["AdapterOut"]["properties"]
        assert schema["warnings"]["description"]


def _peft(folder: Path, targets: Any) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
    }))
    gen = torch.Generator().manual_seed(5)
    state = {}
    for i in range(2):
        for target in ("query", "value"):
            path = f"base_model.model.encoder.layer.{i}.attention.self.{target}"
            state[f"{path}.lora_A.weight"] = torch.randn(4, 32, generator=gen) * 0.2
            state[f"{path}.lora_B.weight"] = torch.randn(32, 4, generator=gen) * 0.2
    save_file(state, str(folder / "adapter_model.safetensors"))
    return folder


def test_peft_target_modules_must_match_the_tensors(srv: Running, good: Path, tmp_path: Path) -> None:
    _refused(srv, _files(_peft(tmp_path / "wrong", ["key"])), 422, "target_modules", "attention.self.query", "attention.self.value")
    with srv.client("acme-key", timeout=TIMEOUT) as c:
        r = upload_files(c, "peftok", _peft(tmp_path / "ok", ["query", "value"]))
        assert r.status_code == 201 and r.json()["warnings"] == [], r.text
        r = upload_files(c, "peftextra", _peft(tmp_path / "extra", ["query", "value", "dense"]))
        assert r.status_code == 201, r.text
        assert any("dense" in w for w in r.json()["warnings"]), r.json()


def test_a_shadowed_shared_adapter_is_marked(srv: Running, good: Path) -> None:
    with srv.client("root-key", timeout=TIMEOUT) as admin, srv.client("acme-key", timeout=TIMEOUT) as acme, \
            srv.client("beta-key", timeout=TIMEOUT) as beta:
        assert upload_files(admin, "common", good, shared="true").status_code == 201
        assert upload_files(acme, "common", good).status_code == 201
        mine = [(a["owner"], a["shadowed"]) for a in acme.get("/v1/adapters").json()["data"] if a["name"] == "common"]
        assert sorted(mine) == [("shared", True), ("tenant", False)]
        theirs = [(a["owner"], a["shadowed"]) for a in beta.get("/v1/adapters").json()["data"] if a["name"] == "common"]
        assert theirs == [("shared", False)]
        schema = acme.get("/openapi.json").json()["components"]["schemas"]["AdapterOut"]["properties"]
        assert schema["shadowed"]["description"]


ARCHIVE_FORMATS = {
    "tar": ("a.tar", lambda e: _tar_mode(e, "w")), "tar.gz": ("a.tar.gz", lambda e: _tar_mode(e, "w:gz")),
    "tar.bz2": ("a.tar.bz2", lambda e: _tar_mode(e, "w:bz2")), "tar.xz": ("a.tar.xz", lambda e: _tar_mode(e, "w:xz")),
    **{f"zip-{m}": ("a.zip", lambda e, m=m: _zip_method(e, ZIP_METHODS[m])) for m in ZIP_METHODS},
}


def _tar_mode(entries: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(f"ad/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip_method(entries: dict[str, bytes], method: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", sorted(ARCHIVE_FORMATS))
def test_corrupt_archives_are_refused_not_crashed(tmp_path: Path, adapter_factory: Callable[[str, int], Path], fmt: str) -> None:
    """Seeded byte flips and truncations of a good archive: each one extracts or is an UploadRejected (a
    zip claiming a newer format version was a NotImplementedError, a 500)."""
    import random

    filename, build = ARCHIVE_FORMATS[fmt]
    good = build({p.name: p.read_bytes() for p in adapter_factory("seq_bn", 7).iterdir()})
    rng = random.Random(fmt)
    arc, dest = tmp_path / filename, tmp_path / "out"
    corrupt: list[bytes] = []
    if fmt.startswith("zip"):  # "version needed to extract" 25.5 in the central directory
        at = good.index(b"PK\x01\x02") + 6
        corrupt.append(good[:at] + b"\xff\x00" + good[at + 2:])
    for _ in range(60):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(1, len(data))]
        corrupt.append(bytes(data))
    for data in corrupt:
        arc.write_bytes(data)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        try:
            extract_archive(arc, filename, dest, ByteBudget(1 << 20))
        except UploadRejected as exc:
            assert 400 <= exc.status < 500
            assert not list(dest.iterdir())
