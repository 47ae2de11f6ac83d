"""Fixtures: a tiny random BERT + offline tokenizer, adapters made with adapters_core, real uvicorn servers."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from transformers import BertConfig, BertModel, BertTokenizerFast

from server.cli import uvicorn_config
from server.http.app import EngineFactory, create_app, default_engine
from server.http.auth import hash_key
from server.settings import Settings
from tests.server.gen_support import lm_adapters, lm_dirs  # noqa: F401 (generation fixtures)

WORDS = (
    "the a an good bad movie film great terrible plot actor acting story ending love hate was is very not "
    "really quite boring fun funny sad happy dark light long short music score scene"
).split()
SENTENCES = [
    "the movie was great",
    "a very boring film",
    "the acting is not good",
    "love the music score",
    "the ending was really sad",
    "fun",
]
KEYS = {"acme-key": ("acme", "tenant"), "beta-key": ("beta", "tenant"), "root-key": ("ops", "admin")}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BertConfig hidden 32, 2 layers, fixed seed, plus a BertTokenizerFast from a written vocab.txt."""
    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789"]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(root))
    torch.manual_seed(1234)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).eval().save_pretrained(str(root))
    return root


def make_adapter(model_dir: Path, out: Path, config: str, seed: int, name: str = "ad") -> Path:
    """An adapter made and saved by adapters_core, with noisy weights so it changes the output."""
    from adapters_core import AutoAdapterModel

    model = AutoAdapterModel.from_pretrained(str(model_dir))
    model.add_adapter(name, config=config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_adapter(str(out), name)
    return out


@pytest.fixture(scope="session")
def adapter_factory(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], Path]:
    root = tmp_path_factory.mktemp("adapters")
    cache: dict[tuple[str, int], Path] = {}

    def make(config: str, seed: int) -> Path:
        key = (config, seed)
        if key not in cache:
            safe = "".join(c if c.isalnum() else "_" for c in config)
            cache[key] = make_adapter(tiny_model_dir, root / f"{safe}_{seed}", config, seed)
        return cache[key]

    return make


def with_head(folder: Path, out: Path, labels: tuple[str, ...] = ("neg", "pos"), seed: int = 3) -> Path:
    """Copy an adapter and add an AdapterHub classification head (2 layers, tanh, the given labels)."""
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    shutil.copytree(folder, out)
    name = json.loads((folder / "adapter_config.json").read_text())["name"]
    (out / "head_config.json").write_text(json.dumps({
        "config": {"head_type": "classification", "num_labels": len(labels), "layers": 2, "activation_function": "tanh",
                   "label2id": {label: i for i, label in enumerate(labels)}, "use_pooler": False, "bias": True,
                   "dropout_prob": None},
        "hidden_size": 32, "model_class": "BertAdapterModel", "model_name": "tiny", "model_type": "bert", "name": name,
    }))
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    save_file({
        f"heads.{name}.1.weight": torch.randn(32, 32, generator=gen), f"heads.{name}.1.bias": torch.randn(32, generator=gen),
        f"heads.{name}.4.weight": torch.randn(n, 32, generator=gen), f"heads.{name}.4.bias": torch.randn(n, generator=gen),
    }, str(out / "model_head.safetensors"))
    return out


class Reference:
    """What the library computes in-process: mean-pooled, L2-normalised last_hidden_state."""

    def __init__(self, model_dir: Path) -> None:
        from adapters_core import AutoAdapterModel

        self.model = AutoAdapterModel.from_pretrained(str(model_dir))
        self.model.eval()
        self.tok = BertTokenizerFast.from_pretrained(str(model_dir))
        self._n = 0

    def embed(self, folder: Path, texts: list[str]) -> np.ndarray:
        """Embeddings with one adapter, mean-pooled by hand (independent of the server's pooling)."""
        self._n += 1
        name = f"ref{self._n}"
        return self.embed_composition({name: folder}, name, texts)

    def embed_composition(self, folders: dict[str, Path], setup: Any, texts: list[str], fusion: Path | None = None) -> np.ndarray:
        """Embeddings under a composition block over the given adapters (loaded under their own names), with
        an AdapterFusion saved over those names loaded too when given."""
        from adapters_core import AdapterSetup

        for name, folder in folders.items():
            self.model.load_adapter(str(folder), load_as=name)
        if fusion is not None:
            self.model.load_adapter_fusion(str(fusion))  # deleting its adapters below deletes it too
        try:
            enc = self.tok(texts, padding=True, return_tensors="pt")
            with torch.inference_mode(), AdapterSetup(setup):
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
        finally:
            for name in folders:
                self.model.delete_adapter(name)

    def logits(self, folder: Path, texts: list[str]) -> np.ndarray:
        """The adapter's own prediction head's logits."""
        from adapters_core import AdapterSetup

        self._n += 1
        name = f"ref{self._n}"
        self.model.load_adapter(str(folder), load_as=name)
        try:
            enc = self.tok(texts, padding=True, return_tensors="pt")
            with torch.inference_mode(), AdapterSetup(name, head_setup=name):
                return self.model(**enc).logits.numpy()
        finally:
            self.model.delete_adapter(name)


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path) -> Reference:
    return Reference(tiny_model_dir)


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    entries = [{"sha256": hash_key(k), "tenant": t, "role": r} for k, (t, r) in KEYS.items()]
    path.write_text(json.dumps({"keys": entries}))
    return path


@dataclass
class Running:
    url: str
    app: FastAPI
    settings: Settings

    def client(self, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=auth(key) if key else {}, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(settings: Settings, engine_factory: EngineFactory = default_engine) -> Iterator[Running]:
    """A real uvicorn server on 127.0.0.1 (random free port) in a background thread, configured as `serve` runs it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(settings, engine_factory)
    config = uvicorn_config(app, settings, log_level="warning")
    server = uvicorn.Server(config)
    server.capture_signals = _no_signals  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{port}", app, settings)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def _no_signals() -> Iterator[None]:
    yield


def settings_for(model_dir: Path, store: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {"model_path": str(model_dir), "store_dir": store, "device": "cpu", "max_wait_ms": 20}
    base.update(kw)
    return Settings(**base)


def make_fusion(model_dir: Path, folders: dict[str, Path], out: Path, seed: int) -> Path:
    """An AdapterFusion over the given adapters (saved under those names), with noisy weights, saved by adapters_core."""
    from adapters_core import AutoAdapterModel, Fuse

    model = AutoAdapterModel.from_pretrained(str(model_dir))
    for name, folder in folders.items():
        model.load_adapter(str(folder), load_as=name)
    fuse = Fuse(*folders)
    model.add_adapter_fusion(fuse)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.fusion_named_parameters(fuse):
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_adapter_fusion(str(out), fuse)
    return out


def upload_files(client: httpx.Client, name: str, folder: Path, path: str = "/v1/adapters", **params: Any) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]
    data = {"name": name} if path == "/v1/adapters" else {}
    return client.post(path, data=data, files=files, params=params)


def store_snapshot(root: Path) -> dict[str, bytes]:
    """Every stored file and its bytes (staging and trash excluded)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).parts[0].startswith(".")
    }
