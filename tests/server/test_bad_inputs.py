"""Every bad input gets a 4xx problem+json with a useful detail and leaves the store unchanged."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from tests.server.conftest import Running, make_adapter, serve, settings_for, store_snapshot, upload_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    store = tmp_path_factory.mktemp("store-bad")
    settings = settings_for(tiny_model_dir, store, api_keys_file=keys_file, max_upload_mb=1, max_inputs=8)
    with serve(settings) as running:
        yield running


@pytest.fixture(scope="module")
def good(srv: Running, adapter_factory: Callable[[str, int], Path]) -> Path:
    folder = adapter_factory("seq_bn", 5)
    with srv.client("acme-key") as c:
        assert upload_files(c, "good", folder).status_code == 201
    return folder


def _files(folder: Path, rename: dict[str, str] | None = None) -> list[tuple[str, tuple[str, bytes, str]]]:
    rename = rename or {}
    return [("files", (rename.get(p.name, p.name), p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]


def _tar(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _assert_problem(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert set(body) >= {"type", "title", "status", "detail"} and body["status"] == status
    for needle in needles:
        assert needle.lower() in body["detail"].lower(), body["detail"]


def test_bad_uploads(srv: Running, good: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    # wrong-shape weights: one tensor transposed
    wrong = tmp_path / "wrong"
    shutil.copytree(good, wrong)
    tensors = load_file(str(wrong / "adapter.safetensors"))
    key = next(k for k in sorted(tensors) if tensors[k].dim() == 2)
    tensors[key] = tensors[key].t().contiguous()
    save_file(tensors, str(wrong / "adapter.safetensors"))
    # a config (and weights) made for another hidden size
    other_dir = tmp_path / "bert64"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).save_pretrained(str(other_dir))
    other = make_adapter(other_dir, tmp_path / "other", "seq_bn", 1)
    files = {p.name: p.read_bytes() for p in good.iterdir()}
    pickle = tmp_path / "pickled"
    pickle.mkdir()
    (pickle / "adapter_config.json").write_bytes(files["adapter_config.json"])
    (pickle / "pytorch_adapter.bin").write_bytes(b"\x80\x04not really a pickle")
    bad_cfg = tmp_path / "badcfg"
    shutil.copytree(good, bad_cfg)
    (bad_cfg / "adapter_config.json").write_text("{not json")

    cases: list[tuple[str, dict, int, tuple[str, ...]]] = [
        ("wrong shape", {"files": _files(wrong)}, 422, ("shape", key.split(".")[-2])),
        ("other hidden size", {"files": _files(other)}, 422, ("hidden",)),
        ("pickle", {"files": _files(pickle)}, 415, ("pickle",)),
        ("bad config json", {"files": _files(bad_cfg)}, 422, ("adapter_config.json",)),
        ("missing weights", {"files": [f for f in _files(good) if f[1][0] == "adapter_config.json"]}, 422, ("weights",)),
        ("unknown file", {"files": _files(good, {"adapter_config.json": "config.yaml"})}, 422, ("config.yaml",)),
        ("tar ../", {"files": [("archive", ("a.tar.gz", _tar({"../adapter_config.json": b"{}"}), "application/gzip"))]}, 422, ("..",)),
        ("tar absolute", {"files": [("archive", ("a.tar.gz", _tar({"/tmp/adapter_config.json": b"{}"}), "application/gzip"))]}, 422, ("absolute",)),
        ("zip ../", {"files": [("archive", ("a.zip", _zip({"x/../../adapter.safetensors": b"x"}), "application/zip"))]}, 422, ("..",)),
        ("zip absolute", {"files": [("archive", ("a.zip", _zip({"/etc/adapter_config.json": b"{}"}), "application/zip"))]}, 422, ("absolute",)),
        ("oversized", {"files": [("files", ("adapter.safetensors", b"\0" * (1536 * 1024), "application/octet-stream"))]}, 413, ("limit",)),
        ("no files", {}, 422, ("files",)),
    ]
    with srv.client("acme-key") as c:
        c.post("/v1/adapters", data={"name": "probe"}, files=_files(good))  # a second adapter to compare against
        before = store_snapshot(srv.settings.store_dir)
        for label, kwargs, status, needles in cases:
            for name in ("good", "fresh"):  # a new version of an existing adapter, and a new adapter
                r = c.post("/v1/adapters", data={"name": name}, **kwargs)
                _assert_problem(r, status, *needles)
            assert store_snapshot(srv.settings.store_dir) == before, label
        r = c.post("/v1/adapters", data={"name": "../evil"}, files=_files(good))
        _assert_problem(r, 422, "name")
        r = c.post("/v1/adapters", content=b"{}", headers={"content-type": "application/json"})
        _assert_problem(r, 415, "multipart")
        assert store_snapshot(srv.settings.store_dir) == before
        assert not [p for p in (srv.settings.store_dir / ".tmp").iterdir()]


def test_bad_inference_requests(srv: Running, good: Path) -> None:
    long_text = " ".join(["film"] * 300)
    cases: list[tuple[str, object, int, tuple[str, ...]]] = [
        ("malformed json", b'{"inputs": ["a", "adapters": "good"', 400, ("json",)),
        ("unknown adapter", {"inputs": ["a"], "adapters": "nope"}, 404, ("nope",)),
        ("invalid composition", {"inputs": ["a"], "adapters": {"stack": []}}, 422, ("child",)),
        ("unknown block", {"inputs": ["a"], "adapters": {"mix": ["good"]}}, 422, ("block key",)),
        ("bad nesting", {"inputs": ["a"], "adapters": {"fuse": [{"parallel": ["good", "good"]}]}}, 422, ("nesting",)),
        ("too many inputs", {"inputs": ["a"] * 9, "adapters": "good"}, 413, ("9 inputs", "8")),
        ("over-long text", {"inputs": ["fun", long_text], "adapters": "good"}, 422, ("input 1", "tokens", "truncate")),
        ("empty inputs", {"inputs": [], "adapters": "good"}, 422, ("at least one",)),
        ("wrong type", {"inputs": "a", "adapters": "good"}, 422, ("inputs",)),
        ("unknown field", {"inputs": ["a"], "adapters": "good", "temperature": 1}, 422, ("temperature",)),
        ("head without one", {"inputs": ["a"], "adapters": "good", "task": "classification"}, 422, ("head",)),
    ]
    with srv.client("acme-key") as c:
        before = store_snapshot(srv.settings.store_dir)
        for label, body, status, needles in cases:
            if isinstance(body, bytes):
                r = c.post("/v1/infer", content=body, headers={"content-type": "application/json"})
            else:
                r = c.post("/v1/infer", json=body)
            _assert_problem(r, status, *needles)
            assert label
        huge = {"inputs": ["film " * 100_000], "adapters": "good"}  # over the JSON body limit
        _assert_problem(c.post("/v1/infer", json=huge), 413, "limit")
        r = c.post("/v1/embeddings", json={"model": "good", "input": [long_text]})
        _assert_problem(r, 422, "tokens")
        r = c.post("/v1/embeddings", content=b"nope", headers={"content-type": "application/json"})
        _assert_problem(r, 400, "json")
        assert store_snapshot(srv.settings.store_dir) == before


def test_truncation_is_opt_in(srv: Running, good: Path) -> None:
    long_text = " ".join(["film"] * 300)
    with srv.client("acme-key") as c:
        r = c.post("/v1/infer", json={"inputs": ["fun", long_text], "adapters": "good", "truncate": True})
        assert r.status_code == 200, r.text
        assert [x["truncated"] for x in r.json()["results"]] == [False, True]
        assert r.json()["usage"]["prompt_tokens"] == 3 + 128


def test_unknown_route_and_method(srv: Running) -> None:
    with srv.client("acme-key") as c:
        _assert_problem(c.get("/v1/nothing"), 404)
        _assert_problem(c.put("/v1/infer", json={}), 405)


def test_openapi_declares_responses(srv: Running) -> None:
    with srv.client() as c:
        doc = c.get("/openapi.json").json()
    paths = doc["paths"]
    assert "text/plain; version=0.0.4; charset=utf-8" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    for path, ops in paths.items():
        for op in ops.values():
            for code, resp in op["responses"].items():
                if int(code) >= 400 and path != "/readyz":
                    assert list(resp["content"]) == ["application/problem+json"], (path, code)
    infer = paths["/v1/infer"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "422", "429", "503", "504"} <= set(infer)
    assert "multipart/form-data" in paths["/v1/adapters"]["post"]["requestBody"]["content"]
    assert json.dumps(doc)
