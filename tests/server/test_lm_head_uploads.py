"""AdapterHub LM adapter folders as AdapterHub writes them (issue 14, item 5): the LM head beside the adapter.

`save_adapter(..., with_head=True)` on a causal LM writes head_config.json + model_head.safetensors holding the LM
head, a copy of the tied embedding or of `lm_head.weight` (SmolLM2-135M: 113 MB, over the default upload limit).
An LM head equal to the backbone's uploads beyond the upload limit, is not stored, and generation equals the
adapter's without it; any other LM head is a 422; nothing refused or cut off touches a stored version.

The folders are written here as AdapterHub writes them (the library itself leaves a tied projection out): the
flexible form of an XAdapterModel (`heads.<name>.0.weight`, head_type causal_lm) and the static form of an
init()'d XForCausalLM (`lm_head.weight`, "config": null).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from server.execution.backbone_head import find_backbone_head
from server.registry.lm_head import fingerprint
from server.registry.safetensors_check import read_safetensors_header
from tests.server.conftest import Running, serve, settings_for, store_snapshot, upload_files
from tests.server.gen_support import make_lm_adapter, make_tokenizer

pytestmark = pytest.mark.slow

TIMEOUT = 60.0
HIDDEN = 768  # the head (~300 x 768 float32, ~0.9 MiB) is larger than MAX_UPLOAD_MB plus the middleware's framing slack
MAX_UPLOAD_MB = 0.25
CLASSES = {"gpt2": ("GPT2LMHeadModel", "GPT2AdapterModel"), "llama": ("LlamaForCausalLM", "LlamaAdapterModel")}


@pytest.fixture(scope="module")
def tied_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random one-layer GPT-2 with tied embeddings (as SmolLM2), seeded, and the tests' BPE tokenizer."""
    folder = tmp_path_factory.mktemp("tied-gpt2")
    tok = make_tokenizer(folder)
    torch.manual_seed(11)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=HIDDEN, n_layer=1, n_head=4, n_positions=128,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # sharper logits, so greedy choices have clear margins
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.eval().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapter(tied_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lm_adapter(tied_lm, tmp_path_factory.mktemp("lm-lora") / "lora", "lora", 5)


@pytest.fixture(scope="module")
def srv(tied_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    settings = settings_for(tied_lm, tmp_path_factory.mktemp("store-lm-head"), max_upload_mb=MAX_UPLOAD_MB, torch_threads=1)
    with serve(settings) as running:
        yield running


def backbone_projection(model_dir: Path) -> torch.Tensor:
    """The LM head the backbone generates with: `lm_head.weight`, else the tied input embedding."""
    state = load_file(str(model_dir / "model.safetensors"))
    if "lm_head.weight" in state:
        return state["lm_head.weight"]
    return next(v for k, v in state.items() if k.endswith(("wte.weight", "embed_tokens.weight")))


def with_lm_head(adapter: Path, out: Path, weight: torch.Tensor, static: bool = False, model_type: str = "gpt2",
                 config: dict[str, Any] | None = None, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """`adapter` plus an LM head as AdapterHub's save_adapter(with_head=True, use_safetensors=True) writes it: from
    an init()'d XForCausalLM (`static`) or an XAdapterModel with add_causal_lm_head."""
    shutil.copytree(adapter, out)
    name = json.loads((adapter / "adapter_config.json").read_text())["name"]
    vocab, hidden = weight.shape
    static_class, flex_class = CLASSES[model_type]
    meta = {"hidden_size": hidden, "model_name": "tiny", "model_type": model_type, "version": "adapters.1.1.0"}
    if static:
        head = {**meta, "config": None, "model_class": static_class, "name": None, "num_labels": 2,
                "label2id": {"LABEL_0": 0, "LABEL_1": 1}}
        state = {"lm_head.weight": weight}
    else:
        head_config = {"head_type": "causal_lm", "vocab_size": vocab, "embedding_size": hidden, "layers": 1,
                       "activation_function": None, "layer_norm": False, "bias": False, "shift_labels": True,
                       "label2id": None, "dropout_prob": None, **(config or {})}
        head = {**meta, "config": head_config, "model_class": flex_class, "name": name}
        state = {f"heads.{name}.0.weight": weight}
    (out / "head_config.json").write_text(json.dumps(head, indent=2, sort_keys=True))
    save_file({k: v.contiguous() for k, v in {**state, **(extra or {})}.items()}, str(out / "model_head.safetensors"),
              metadata={"format": "pt"})
    return out


def complete(c: httpx.Client, model: str, prompt: str = "once upon a time") -> str:
    r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def stored_files(running: Running, name: str, version: int = 1) -> set[str]:
    return {p.name for p in (running.settings.store_dir / "default" / name / str(version)).iterdir()}


def refused(running: Running, name: str, files: list[Any], status: int, *needles: str) -> dict[str, Any]:
    before = store_snapshot(running.settings.store_dir)
    with running.client(timeout=TIMEOUT) as c:
        r = c.post("/v1/adapters", data={"name": name}, files=files)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    for needle in needles:
        assert needle.lower() in body["detail"].lower(), body["detail"]
    assert store_snapshot(running.settings.store_dir) == before
    return dict(body)


def parts(folder: Path) -> list[Any]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]


# -- the backbone's LM head ------------------------------------------------------------------------
def test_the_backbone_head_is_found_in_its_files(tied_lm: Path, lm_dirs: dict[str, Path]) -> None:
    """Tied (GPT-2: the input embedding) and untied (Llama: lm_head.weight), from safetensors headers only."""
    from transformers import AutoConfig

    from adapters_core import AutoAdapterModel

    for folder, key in ((tied_lm, "transformer.wte.weight"), (lm_dirs["llama"], "lm_head.weight")):
        with torch.device("meta"):
            model = AutoAdapterModel.from_config(AutoConfig.from_pretrained(str(folder)))
        head = find_backbone_head(str(folder), model)
        assert (head.path, head.key) == (folder / "model.safetensors", key)
        weight = backbone_projection(folder)
        assert head.shape == tuple(weight.shape)
        assert head.allowance >= 4 * weight.numel()


def test_fingerprints_compare_values_as_float32(tmp_path: Path) -> None:
    """bf16 and f16 values widen to float32 exactly: the same values stored either way match; one ulp differs."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 16, generator=gen).to(torch.bfloat16)
    nudged = w.float().clone()
    nudged[3, 5] = torch.nextafter(nudged[3, 5], torch.tensor(10.0))
    save_file({"a": w, "b": w.float(), "c": nudged, "d": w.float().T.contiguous()}, str(tmp_path / "h.safetensors"))
    entries = read_safetensors_header(tmp_path / "h.safetensors")
    prints = {k: fingerprint(tmp_path / "h.safetensors", e) for k, e in entries.items()}
    assert prints["a"] == prints["b"]
    assert prints["c"] != prints["b"] and prints["d"] != prints["b"]  # one value; same bytes in another shape


# -- an identical head: uploaded beyond the upload limit, not stored, served as the adapter alone -----
@pytest.mark.parametrize("static", [False, True], ids=["flex-causal_lm", "static-lm_head"])
def test_the_backbones_head_uploads_beyond_the_limit_and_is_not_stored(
    srv: Running, tied_lm: Path, adapter: Path, tmp_path: Path, static: bool
) -> None:
    folder = with_lm_head(adapter, tmp_path / "headed", backbone_projection(tied_lm), static=static)
    head_bytes = (folder / "model_head.safetensors").stat().st_size
    body_bytes = sum(p.stat().st_size for p in folder.iterdir())
    assert head_bytes > srv.settings.max_upload_bytes + 256 * 1024  # beyond the limit and the middleware's slack
    name = "headed-static" if static else "headed-flex"
    with srv.client(timeout=TIMEOUT) as c:
        r = upload_files(c, name, folder)
        assert r.status_code == 201, r.text
        out = r.json()
        assert out["lm_head"] == "backbone" and not out["has_head"] and out["head"] is None
        assert set(out["files"]) == {"adapter_config.json", "adapter.safetensors"}
        assert out["size"] < body_bytes - head_bytes + 1024
        assert any("equals this backbone's LM head" in w for w in out["warnings"])
        assert stored_files(srv, name) == {"adapter_config.json", "adapter.safetensors", "meta.json"}
        meta = json.loads((srv.settings.store_dir / "default" / name / "1" / "meta.json").read_text())
        assert meta["extra"]["lm_head"] == "backbone"
        assert c.get(f"/v1/adapters/{name}").json()["lm_head"] == "backbone"
        assert upload_files(c, "plain", adapter).status_code == 201
        base = Path(srv.settings.model_path).name
        for prompt in ("once upon a time", "the movie was"):
            assert complete(c, name, prompt) == complete(c, "plain", prompt) != complete(c, base, prompt)
        c.delete("/v1/adapters/plain")


def test_archives_with_the_backbones_head(srv: Running, tied_lm: Path, adapter: Path, tmp_path: Path) -> None:
    """A .tar.gz and a .zip of the folder: the head member has its own budget while the archive unpacks."""
    folder = with_lm_head(adapter, tmp_path / "headed", backbone_projection(tied_lm))
    tgz, zipped = io.BytesIO(), io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tf:
        tf.add(str(folder), arcname="my-adapter")
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, f"my-adapter/{p.name}")
    with srv.client(timeout=TIMEOUT) as c:
        for name, (filename, data) in {"arc-tgz": ("a.tar.gz", tgz.getvalue()), "arc-zip": ("a.zip", zipped.getvalue())}.items():
            r = c.post("/v1/adapters", data={"name": name}, files=[("archive", (filename, data, "application/octet-stream"))])
            assert r.status_code == 201, r.text
            assert r.json()["lm_head"] == "backbone"
            assert stored_files(srv, name) == {"adapter_config.json", "adapter.safetensors", "meta.json"}


# -- other heads: refused, and the adapter's own files keep the upload limit ------------------------
def test_a_head_that_is_not_the_backbones_is_a_422(srv: Running, tied_lm: Path, adapter: Path, tmp_path: Path) -> None:
    weight = backbone_projection(tied_lm)
    one_ulp = weight.clone()
    one_ulp[7, 3] = torch.nextafter(one_ulp[7, 3], torch.tensor(10.0))
    name = json.loads((adapter / "adapter_config.json").read_text())["name"]
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {
        "trained": (with_lm_head(adapter, tmp_path / "trained", weight + 0.01), ("other values",)),
        "one value": (with_lm_head(adapter, tmp_path / "ulp", one_ulp, static=True), ("other values",)),
        "shape": (with_lm_head(adapter, tmp_path / "shape", weight[:-1]), ("shape", str(list(weight.shape)))),
        "layers": (with_lm_head(adapter, tmp_path / "layers", weight, config={"layers": 2},
                                extra={f"heads.{name}.1.weight": torch.zeros(4, 4)}), ("layers=2",)),
        "bias": (with_lm_head(adapter, tmp_path / "bias", weight, config={"bias": True},
                              extra={f"heads.{name}.0.bias": torch.zeros(weight.shape[0])}), ("bias=True",)),
        "static extra": (with_lm_head(adapter, tmp_path / "static", weight, static=True,
                                      extra={"lm_head.bias": torch.zeros(weight.shape[0])}), ("lm_head.bias",)),
    }
    for case, (folder, needles) in cases.items():
        body = refused(srv, "differs", parts(folder), 422, "not this backbone's lm head", "not served", *needles)
        assert body["type"].endswith("lm-head-differs"), (case, body)


def test_only_an_lm_head_may_exceed_the_upload_limit(srv: Running, tied_lm: Path, adapter: Path, tmp_path: Path) -> None:
    weight = backbone_projection(tied_lm)
    # adapter weights over the limit
    big = tmp_path / "big"
    shutil.copytree(adapter, big)
    save_file({"pad": torch.zeros(srv.settings.max_upload_bytes // 4 + 1)}, str(big / "adapter.safetensors"))
    refused(srv, "big", parts(big), 413, "limit of 0.25 MiB")
    # a classification head over the limit: its bytes count against the upload limit (it is not an LM head)
    clf = with_lm_head(adapter, tmp_path / "clf", weight)
    name = json.loads((adapter / "adapter_config.json").read_text())["name"]
    (clf / "head_config.json").write_text(json.dumps({
        "config": {"head_type": "classification", "num_labels": 200, "layers": 1, "activation_function": None},
        "hidden_size": HIDDEN, "model_class": "GPT2AdapterModel", "name": name}))
    save_file({f"heads.{name}.1.weight": torch.zeros(200, HIDDEN)}, str(clf / "model_head.safetensors"))
    assert (clf / "model_head.safetensors").stat().st_size > srv.settings.max_upload_bytes
    refused(srv, "clf", parts(clf), 413, "limit of 0.25 MiB")
    # an LM head file beyond a float32 copy of the backbone's (and a bias, and header room)
    wide = with_lm_head(adapter, tmp_path / "wide", weight, extra={"pad": torch.zeros(20_000)})
    refused(srv, "wide", parts(wide), 413, "model_head.safetensors exceeds", "float32 copy")


def test_a_pickled_head_is_refused_unread(srv: Running, adapter: Path) -> None:
    files = [*parts(adapter), ("files", ("pytorch_model_head.bin", b"\x80\x04K\x01.", "application/octet-stream"))]
    body = refused(srv, "pickled", files, 415, "pytorch_model_head.bin", "never unpickled", "use_safetensors=True")
    assert body["type"].endswith("pickle-rejected")


# -- cut-off uploads leave the stored version as it was --------------------------------------------
def _send_half(running: Running, path: str, files: list[Any]) -> None:
    """Send the headers and half of a multipart body that says it is whole, then hang up."""
    request = httpx.Request("POST", running.url + path, files=files)
    body = request.read()
    url = urlparse(running.url)
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: {request.headers['content-type']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=TIMEOUT) as s:
        s.sendall(head + body[: len(body) // 2])


def test_cut_off_uploads_leave_the_previous_version(srv: Running, tied_lm: Path, adapter: Path, tmp_path: Path) -> None:
    folder = with_lm_head(adapter, tmp_path / "headed", backbone_projection(tied_lm))
    with srv.client(timeout=TIMEOUT) as c:
        assert upload_files(c, "kept", folder).status_code == 201
        before = store_snapshot(srv.settings.store_dir)
        text = complete(c, "kept")
        _send_half(srv, "/v1/adapters/kept/versions", parts(folder))
        # a head file cut short inside a well-formed body
        cut = [(k, (n, data[: len(data) // 2] if n == "model_head.safetensors" else data, t)) for k, (n, data, t) in parts(folder)]
        r = c.post("/v1/adapters/kept/versions", files=cut)
        assert r.status_code == 422 and "model_head.safetensors" in r.json()["detail"], r.text
        # a multipart body that stops in the middle of the head part
        request = httpx.Request("POST", srv.url + "/v1/adapters/kept/versions", files=parts(folder))
        body = request.read()
        r = c.post("/v1/adapters/kept/versions", content=body[: len(body) - 200_000],
                   headers={"content-type": request.headers["content-type"]})
        assert 400 <= r.status_code < 500, r.text
        deadline = time.monotonic() + 10  # the hung-up request may still be finishing on the server
        while any((srv.settings.store_dir / ".tmp").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any((srv.settings.store_dir / ".tmp").iterdir())
        assert store_snapshot(srv.settings.store_dir) == before
        assert c.get("/v1/adapters/kept").json()["versions"] == [1]
        assert complete(c, "kept") == text
        r = upload_files(c, "kept", folder, path="/v1/adapters/kept/versions")
        assert r.status_code == 201 and r.json()["version"] == 2, r.text


# -- an untied backbone (lm_head.weight) -----------------------------------------------------------
def test_an_untied_backbones_head(lm_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Llama with its own lm_head.weight: its copy is recognised (static form), its input embedding is not."""
    folder = lm_dirs["llama"]
    plain = make_lm_adapter(folder, tmp_path / "lora", "lora", 9)
    state = load_file(str(folder / "model.safetensors"))
    same = with_lm_head(plain, tmp_path / "same", state["lm_head.weight"], static=True, model_type="llama")
    other = with_lm_head(plain, tmp_path / "other", state["model.embed_tokens.weight"], static=True, model_type="llama")
    with serve(settings_for(folder, tmp_path / "store", torch_threads=1)) as running, running.client(timeout=TIMEOUT) as c:
        r = upload_files(c, "same", same)
        assert r.status_code == 201 and r.json()["lm_head"] == "backbone", r.text
        assert upload_files(c, "plain", plain).status_code == 201
        assert complete(c, "same") == complete(c, "plain")
        refused(running, "other", parts(other), 422, "other values")


# -- the built-in SmolLM2 with default settings ----------------------------------------------------
def test_smollm2_adapter_with_its_113_mb_head_uploads_with_default_settings(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import adapters_core
    from server.execution.builtin_models import is_converted
    from server.settings import Settings, builtin_model_dir, resolve_model_path

    assert is_converted(builtin_model_dir("smollm2")), "`make install` runs `adapterserve convert smollm2`"
    model_dir = Path(resolve_model_path("smollm2"))
    model = adapters_core.init(AutoModelForCausalLM.from_pretrained(str(model_dir)).eval())
    model.add_adapter("ad", config="lora")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.adapter_parameters("ad"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    plain = tmp_path / "plain"
    model.save_adapter(str(plain), "ad")
    weight = model.get_input_embeddings().weight.detach()
    del model
    folder = with_lm_head(plain, tmp_path / "headed", weight, static=True, model_type="llama")
    del weight
    head_mb = (folder / "model_head.safetensors").stat().st_size / 2**20
    assert head_mb > Settings.model_fields["max_upload_mb"].default  # 112.5 MiB over the default 64
    settings = settings_for(model_dir, tmp_path / "store", torch_threads=1)
    with serve(settings) as running, running.client(timeout=120) as c:
        handles = [open(p, "rb") for p in sorted(folder.iterdir())]  # streamed, not read into memory
        try:
            r = c.post("/v1/adapters", data={"name": "headed"},
                       files=[("files", (Path(h.name).name, h, "application/octet-stream")) for h in handles])
        finally:
            for h in handles:
                h.close()
        assert r.status_code == 201, r.text
        assert r.json()["lm_head"] == "backbone" and set(r.json()["files"]) == {"adapter_config.json", "adapter.safetensors"}
        assert upload_files(c, "plain", plain).status_code == 201
        assert complete(c, "headed", "The capital of France is") == complete(c, "plain", "The capital of France is")
