"""End-to-end against a real uvicorn on 127.0.0.1 with a tiny BERT: correctness, batching, hot swap, tenancy."""

from __future__ import annotations

import concurrent.futures as cf
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.server.conftest import SENTENCES, Reference, Running, serve, settings_for, upload_files, with_head

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    store = tmp_path_factory.mktemp("store")
    with serve(settings_for(tiny_model_dir, store, api_keys_file=keys_file, max_batch_size=64, max_wait_ms=30)) as running:
        yield running


def _emb(resp_json: dict) -> np.ndarray:
    return np.array([r["embedding"] for r in resp_json["results"]], dtype=np.float32)


@pytest.mark.parametrize("config", ["seq_bn", "lora", "prefix_tuning[prefix_length=4,bottleneck_size=16]", "double_seq_bn", "ia3"])
def test_upload_then_infer_equals_library(
    srv: Running, adapter_factory: Callable[[str, int], Path], reference: Reference, config: str
) -> None:
    folder = adapter_factory(config, 7)
    name = "eq_" + re.sub(r"[^a-z0-9]", "", config)[:20]
    with srv.client("acme-key") as c:
        r = upload_files(c, name, folder)
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["name"] == name and body["version"] == 1 and len(body["sha256"]) == 64
        r = c.post("/v1/infer", json={"inputs": SENTENCES, "adapters": name})
        assert r.status_code == 200, r.text
        got = _emb(r.json())
    want = reference.embed(folder, SENTENCES)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-5


def test_32_concurrent_requests_32_adapters(srv: Running, adapter_factory: Callable[[str, int], Path], reference: Reference) -> None:
    configs = ["seq_bn", "lora", "prefix_tuning[prefix_length=4,bottleneck_size=16]", "par_bn[reduction_factor=4]"]
    folders = {f"multi{i}": adapter_factory(configs[i % 4], 100 + i) for i in range(32)}
    with srv.client("acme-key") as c:
        for name, folder in folders.items():
            assert upload_files(c, name, folder).status_code == 201
        before = _distinct_hist(c.get("/metrics").text)

    def call(name: str, text: str) -> np.ndarray:
        with srv.client("acme-key") as c:
            r = c.post("/v1/infer", json={"inputs": [text], "adapters": name})
            assert r.status_code == 200, r.text
            return _emb(r.json())[0]

    texts = {name: SENTENCES[i % len(SENTENCES)] for i, name in enumerate(folders)}
    with cf.ThreadPoolExecutor(32) as pool:
        futures = {name: pool.submit(call, name, texts[name]) for name in folders}
        got = {name: f.result() for name, f in futures.items()}
    for name, folder in folders.items():
        want = reference.embed(folder, [texts[name]])[0]
        assert np.abs(got[name] - want).max() < 1e-5, name
    with srv.client("acme-key") as c:
        after = _distinct_hist(c.get("/metrics").text)
    # at least one forward pass since `before` held more than one distinct adapter
    assert after["count"] - after["le_1"] > before["count"] - before["le_1"]


def _distinct_hist(text: str) -> dict[str, float]:
    count = float(re.search(r"^adapterserve_batch_distinct_adapters_count (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    le1 = float(re.search(r'^adapterserve_batch_distinct_adapters_bucket\{le="1.0"\} (\S+)$', text, re.M).group(1))  # type: ignore[union-attr]
    return {"count": count, "le_1": le1}


def test_hot_swap_while_streaming(srv: Running, adapter_factory: Callable[[str, int], Path], reference: Reference) -> None:
    v1, v2 = adapter_factory("seq_bn", 21), adapter_factory("seq_bn", 22)
    text = [SENTENCES[0], SENTENCES[2]]
    want1, want2 = reference.embed(v1, text), reference.embed(v2, text)
    with srv.client("beta-key") as c:
        assert upload_files(c, "swap", v1).status_code == 201
    stop = False

    def stream() -> list[np.ndarray]:
        out = []
        with srv.client("beta-key") as c:
            while not stop or len(out) < 3:
                r = c.post("/v1/infer", json={"inputs": text, "adapters": "swap"})
                assert r.status_code == 200, r.text
                out.append(_emb(r.json()))
        return out

    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream) for _ in range(4)]
        with srv.client("beta-key") as c:
            r = upload_files(c, "swap", v2, path="/v1/adapters/swap/versions")
            assert r.status_code == 201 and r.json()["version"] == 2
            after = _emb(c.post("/v1/infer", json={"inputs": text, "adapters": "swap"}).json())
        stop = True
        results = [e for f in futures for e in f.result()]
    assert np.abs(after - want2).max() < 1e-5  # new requests use the new version
    for emb in results:
        d1, d2 = np.abs(emb - want1).max(), np.abs(emb - want2).max()
        assert min(d1, d2) < 1e-5


def test_openai_embeddings_and_models(srv: Running, adapter_factory: Callable[[str, int], Path], reference: Reference) -> None:
    folder = adapter_factory("lora", 31)
    with srv.client("acme-key") as c:
        assert upload_files(c, "oai", folder).status_code == 201
        r = c.post("/v1/embeddings", json={"model": "oai", "input": SENTENCES[:3]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "oai"
        assert [d["index"] for d in body["data"]] == [0, 1, 2] and all(d["object"] == "embedding" for d in body["data"])
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
        got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        assert np.abs(got - reference.embed(folder, SENTENCES[:3])).max() < 1e-5
        single = c.post("/v1/embeddings", json={"model": "oai", "input": SENTENCES[0]}).json()
        assert len(single["data"]) == 1
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert "oai" in ids


def test_compositions(srv: Running, adapter_factory: Callable[[str, int], Path], reference: Reference) -> None:
    with srv.client("acme-key") as c:
        assert upload_files(c, "cs1", adapter_factory("seq_bn", 41)).status_code == 201
        assert upload_files(c, "cs2", adapter_factory("seq_bn", 42)).status_code == 201
        assert upload_files(c, "cl1", adapter_factory("lora", 43)).status_code == 201
        for spec in ({"stack": ["cs1", "cs2"]}, {"parallel": ["cs1", "cs2"]}, {"fuse": ["cs1", "cs2"]}):
            r = c.post("/v1/infer", json={"inputs": SENTENCES[:2], "adapters": spec})
            if "fuse" in spec:  # no fusion layer was uploaded: a clear 4xx naming the adapters
                assert r.status_code == 422 and "cs1" in r.json()["detail"] and "a_" not in r.json()["detail"], r.text
                continue
            assert r.status_code == 200, (spec, r.text)
            res = r.json()["results"]
            assert len(res) == 2
            if "parallel" in spec:  # each branch sees its own copy of the batch: branch i == adapter i alone
                got = np.array([x["parallel"] for x in res], dtype=np.float32)  # [inputs, branches, hidden]
                for k, seed in enumerate((41, 42)):
                    want = reference.embed(adapter_factory("seq_bn", seed), SENTENCES[:2])
                    assert np.abs(got[:, k] - want).max() < 1e-5
            else:
                assert len(res[0]["embedding"]) == 32


def test_average_and_stack_equal_the_library(srv: Running, adapter_factory: Callable[[str, int], Path], reference: Reference) -> None:
    from adapters_core import Average, Stack

    f1, f2 = adapter_factory("seq_bn", 44), adapter_factory("lora", 45)
    with srv.client("acme-key") as c:
        assert upload_files(c, "av1", f1).status_code == 201
        assert upload_files(c, "av2", f2).status_code == 201
        r = c.post("/v1/infer", json={"inputs": SENTENCES[:3], "adapters": {"stack": ["av1", "av2"]}})
        assert r.status_code == 200, r.text
        want = reference.embed_composition({"x1": f1, "x2": f2}, Stack("x1", "x2"), SENTENCES[:3])
        assert np.abs(_emb(r.json()) - want).max() < 1e-5
        r = c.post("/v1/infer", json={"inputs": SENTENCES[:2], "adapters": {"average": ["av1", "av2"], "weights": [0.3, 0.7]}})
        assert r.status_code == 200, r.text
        want = reference.embed_composition({"x1": f1, "x2": f2}, Average("x1", "x2", weights=[0.3, 0.7]), SENTENCES[:2])
        assert np.abs(_emb(r.json()) - want).max() < 1e-5


def test_tenant_isolation(srv: Running, adapter_factory: Callable[[str, int], Path]) -> None:
    folder = adapter_factory("seq_bn", 51)
    with srv.client("acme-key") as a, srv.client("beta-key") as b:
        assert upload_files(a, "secret", folder).status_code == 201
        sha = a.get("/v1/adapters/secret").json()["sha256"]
        assert "secret" not in [x["name"] for x in b.get("/v1/adapters").json()["data"]]
        for r in (
            b.get("/v1/adapters/secret"),
            b.post("/v1/infer", json={"inputs": ["x"], "adapters": "secret"}),
            b.post("/v1/embeddings", json={"model": "secret", "input": "x"}),
            b.delete("/v1/adapters/secret"),
            upload_files(b, "secret", folder, path="/v1/adapters/secret/versions"),
        ):
            assert r.status_code == 404, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
        # beta may create its own "secret": a separate adapter that does not touch acme's
        assert upload_files(b, "secret", adapter_factory("seq_bn", 52)).status_code == 201
        assert a.get("/v1/adapters/secret").json()["sha256"] == sha
        assert a.get("/v1/adapters/secret").json()["version"] == 1


def test_missing_or_wrong_key(srv: Running) -> None:
    with srv.client() as c:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "nope"}, {"Authorization": "Basic abc"}):
            r = c.get("/v1/adapters", headers=headers)
            assert r.status_code == 401
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["status"] == 401 and r.json()["detail"]
        assert c.get("/v1/adapters", headers={"X-API-Key": "acme-key"}).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_shared_adapters(srv: Running, adapter_factory: Callable[[str, int], Path]) -> None:
    folder = adapter_factory("lora", 61)
    with srv.client("root-key") as admin, srv.client("acme-key") as acme, srv.client("beta-key") as beta:
        assert upload_files(acme, "common", folder, shared="true").status_code == 403
        r = upload_files(admin, "common", folder, shared="true")
        assert r.status_code == 201 and r.json()["owner"] == "shared"
        for client in (acme, beta):
            assert client.post("/v1/infer", json={"inputs": ["fun"], "adapters": "common"}).status_code == 200
            assert "common" in [x["name"] for x in client.get("/v1/adapters").json()["data"]]
        assert acme.delete("/v1/adapters/common").status_code == 403
        assert acme.delete("/v1/adapters/common", params={"shared": "true"}).status_code == 403
        assert admin.delete("/v1/adapters/common", params={"shared": "true"}).status_code == 200
        assert acme.post("/v1/infer", json={"inputs": ["fun"], "adapters": "common"}).status_code == 404


def test_delete_then_gone(srv: Running, adapter_factory: Callable[[str, int], Path]) -> None:
    with srv.client("acme-key") as c:
        assert upload_files(c, "tmp", adapter_factory("seq_bn", 71)).status_code == 201
        assert c.post("/v1/infer", json={"inputs": ["fun"], "adapters": "tmp"}).status_code == 200
        r = c.delete("/v1/adapters/tmp")
        assert r.status_code == 200 and r.json()["versions"] == [1]
        assert c.get("/v1/adapters/tmp").status_code == 404
        assert c.post("/v1/infer", json={"inputs": ["fun"], "adapters": "tmp"}).status_code == 404




def test_classification_head(srv: Running, adapter_factory: Callable[[str, int], Path], reference: Reference, tmp_path: Path) -> None:
    folder = with_head(adapter_factory("seq_bn", 91), tmp_path / "headed")
    with srv.client("acme-key") as c:
        r = upload_files(c, "clf", folder)
        assert r.status_code == 201, r.text
        assert r.json()["has_head"] and r.json()["head"]["id2label"] == {"0": "neg", "1": "pos"}
        r = c.post("/v1/infer", json={"inputs": SENTENCES[:3], "adapters": "clf"})
        assert r.status_code == 200, r.text
        for res in r.json()["results"]:
            assert res["label"] in ("neg", "pos") and 0.5 <= res["score"] <= 1 and len(res["logits"]) == 2
        got = np.array([res["logits"] for res in r.json()["results"]])
        assert np.abs(got - reference.logits(folder, SENTENCES[:3])).max() < 1e-5
        assert [res["label"] for res in r.json()["results"]] == [["neg", "pos"][int(np.argmax(g))] for g in got]
        r = c.post("/v1/infer", json={"inputs": SENTENCES[:3], "adapters": "clf", "task": "embedding"})
        assert len(r.json()["results"][0]["embedding"]) == 32


def test_classifiers_with_different_heads_share_forward_passes(
    srv: Running, adapter_factory: Callable[[str, int], Path], reference: Reference, tmp_path: Path
) -> None:
    """Concurrent requests for classifiers with different heads (and label sets) run in shared forward passes,
    each row through its own head, and each answer equals the library run alone."""
    label_sets = [("neg", "pos"), ("a", "b", "c"), ("x", "y", "z", "w")]
    configs = ["seq_bn", "lora", "prefix_tuning[prefix_length=4,bottleneck_size=16]"]
    folders = {f"clf{i}": with_head(adapter_factory(configs[i % 3], 200 + i), tmp_path / f"clf{i}", label_sets[i % 3], seed=30 + i)
               for i in range(6)}
    with srv.client("acme-key") as c:
        for name, folder in folders.items():
            assert upload_files(c, name, folder).status_code == 201
        before = _distinct_hist(c.get("/metrics").text)

    def call(name: str, text: str) -> list[dict]:
        with srv.client("acme-key") as c:
            r = c.post("/v1/infer", json={"inputs": [text], "adapters": name})
            assert r.status_code == 200, r.text
            return r.json()["results"]

    jobs = [(name, SENTENCES[k % len(SENTENCES)]) for k in range(4) for name in folders]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: call(*job), jobs))
    for (name, text), results in zip(jobs, got, strict=True):
        i = int(name[3:])
        want = reference.logits(folders[name], [text])[0]
        assert len(results[0]["logits"]) == len(label_sets[i % 3])
        assert np.abs(np.array(results[0]["logits"]) - want).max() < 1e-5, name
        assert results[0]["label"] == label_sets[i % 3][int(np.argmax(want))]
    with srv.client("acme-key") as c:
        after = _distinct_hist(c.get("/metrics").text)
    assert after["count"] - after["le_1"] > before["count"] - before["le_1"], "no forward pass mixed two classifiers"


def test_fast_tokenize_matches_hf_tokenizer(srv: Running) -> None:
    engine = srv.app.state.runtime.engine
    texts = [*SENTENCES, "UPPER case, punctuation!", " ".join(["film"] * 300), ""]
    want = engine.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    assert engine.tokenize(texts) == [list(w) for w in want]


def _peft_lora(folder: Path, r: int = 4) -> Path:
    """A PEFT LoRA folder for the tiny BERT, written with PEFT's file and key names."""
    import json

    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": 8, "target_modules": ["query", "value"],
        "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": "tiny",
    }))
    gen = torch.Generator().manual_seed(17)
    state = {}
    for i in range(2):
        for target in ("query", "value"):
            path = f"base_model.model.encoder.layer.{i}.attention.self.{target}"
            state[f"{path}.lora_A.weight"] = torch.randn(r, 32, generator=gen) * 0.2
            state[f"{path}.lora_B.weight"] = torch.randn(32, r, generator=gen) * 0.2
    save_file(state, str(folder / "adapter_model.safetensors"))
    return folder


def test_peft_folder_as_tar_and_adapterhub_as_zip(srv: Running, adapter_factory: Callable[[str, int], Path],
                                                   reference: Reference, tmp_path: Path) -> None:
    import io
    import tarfile
    import zipfile

    peft = _peft_lora(tmp_path / "peft-lora")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(str(peft), arcname="peft-lora")
    hub = adapter_factory("seq_bn", 93)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        for p in hub.iterdir():
            zf.write(p, p.name)
    with srv.client("acme-key") as c:
        r = c.post("/v1/adapters", data={"name": "peft1"}, files=[("archive", ("peft-lora.tar.gz", buf.getvalue(), "application/gzip"))])
        assert r.status_code == 201, r.text
        assert r.json()["method"] == "lora" and set(r.json()["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
        r = c.post("/v1/adapters", data={"name": "zipped"}, files=[("archive", ("a.zip", zbuf.getvalue(), "application/zip"))])
        assert r.status_code == 201, r.text
        for name, folder in (("peft1", peft), ("zipped", hub)):
            got = _emb(c.post("/v1/infer", json={"inputs": SENTENCES, "adapters": name}).json())
            assert np.abs(got - reference.embed(folder, SENTENCES)).max() < 1e-5


def test_store_is_never_read_on_the_event_loop(srv: Running, adapter_factory: Callable[[str, int], Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every route reads and writes the store (stat, meta.json, listing, rename) on a worker thread: on an
    RWX/NFS volume one slow stat on the event loop would stall every request in flight."""
    import asyncio

    from server.registry.store import AdapterStore

    on_loop: list[str] = []
    for method in ("versions", "meta", "names", "fusions", "all_versions", "usage", "commit", "delete", "staging_dir"):
        real = getattr(AdapterStore, method)

        def spy(*args: object, _real: Callable[..., object] = real, _name: str = method, **kwargs: object) -> object:
            try:
                asyncio.get_running_loop()
                on_loop.append(_name)
            except RuntimeError:
                pass
            return _real(*args, **kwargs)

        monkeypatch.setattr(AdapterStore, method, spy)
    folder = adapter_factory("seq_bn", 61)
    with srv.client("acme-key") as c:
        assert upload_files(c, "offloop", folder).status_code == 201
        assert upload_files(c, "offloop2", folder).status_code == 201
        assert upload_files(c, "offloop", folder, path="/v1/adapters/offloop/versions").status_code == 201
        for spec in ("offloop", {"stack": ["offloop", "offloop2"]}, {"fuse": ["offloop", "offloop2"]}, "missing"):
            assert c.post("/v1/infer", json={"inputs": ["fun"], "adapters": spec}).status_code in (200, 404, 422)
        assert c.post("/v1/embeddings", json={"model": "offloop", "input": "fun"}).status_code == 200
        assert c.get("/v1/adapters/offloop").json()["versions"] == [1, 2]
        assert c.get("/v1/adapters").status_code == 200 and c.get("/v1/models").status_code == 200
        assert c.delete("/v1/adapters/offloop2").status_code == 200
        assert c.delete("/v1/adapters/offloop2").status_code == 404
    assert not on_loop, sorted(set(on_loop))
