"""Bad generation input: each a 4xx that says what is wrong, and nothing is queued. Backbones that cannot do what
is asked: completions on an encoder-only model, embeddings on a causal LM. The model side in this process too."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import Running, serve, settings_for, upload_files
from tests.server.gen_support import SoloReference


@pytest.fixture(scope="module")
def srv(lm_dirs: dict[str, Path], lm_adapters: dict[tuple[str, str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    settings = settings_for(lm_dirs["llama"], tmp_path_factory.mktemp("inputs"), torch_threads=1, max_new_tokens=100)
    with serve(settings) as running:
        with running.client() as c:
            for method in ("lora", "seq_bn"):
                assert upload_files(c, method.replace("_", "-"), lm_adapters[("llama", method)]).status_code == 201
        yield running


GOOD: dict[str, Any] = {"model": "lora", "max_tokens": 4}
CHAT = {**GOOD, "messages": [{"role": "user", "content": "hello"}]}
COMPLETION = {**GOOD, "prompt": "the movie was"}
BAD = [
    ("chat", {"messages": []}, 422, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 422, "role"),
    ("chat", {"messages": [{"role": "user"}]}, 422, "content"),
    ("completion", {"max_tokens": 0}, 422, "max_tokens"),
    ("completion", {"max_tokens": -3}, 422, "max_tokens"),
    ("completion", {"max_tokens": 101}, 422, "the limit is 100"),
    ("completion", {"prompt": "the movie was " * 60, "max_tokens": 100}, 422, "over the context of 256 tokens"),
    ("completion", {"prompt": [5, 6, 100000]}, 422, "token ids"),
    ("completion", {"prompt": ""}, 422, "no tokens"),
    ("completion", {"temperature": -0.1}, 422, "temperature"),
    ("completion", {"top_p": 0}, 422, "top_p"),
    ("completion", {"top_p": 1.5}, 422, "top_p"),
    ("completion", {"stop": ["a", "b", "c", "d", "e"]}, 422, "at most 4"),
    ("completion", {"stop": ["x" * 65]}, 422, "65 characters; at most 64"),
    ("completion", {"n": 2}, 422, "only n=1"),
    ("chat", {"n": 3}, 422, "only n=1"),
    ("completion", {"presence_penalty": 0.5}, 422, "not supported"),
    ("chat", {"frequency_penalty": 1.0}, 422, "not supported"),
    ("completion", {"repetition_penalty": 1.2}, 422, "not supported"),
    ("completion", {"echo": True}, 422, "echo"),
    ("chat", {"logprobs": True}, 422, "logprobs"),
    ("completion", {"adapters": {"parallel": ["lora", "seq-bn"]}}, 422, "cannot be used for generation"),
    ("completion", {"adapters": {"fuse": [{"stack": ["seq-bn"]}, "seq-bn"]}}, 422, "fuse"),
    ("completion", {"model": "nope"}, 404, "nope"),
]


@pytest.mark.parametrize(("route", "change", "status", "says"), BAD, ids=[f"{r}-{'-'.join(c)}-{i}" for i, (r, c, _, _) in enumerate(BAD)])
def test_bad_input_is_a_clear_4xx_and_queues_nothing(srv: Running, route: str, change: dict[str, Any], status: int, says: str) -> None:
    gen = srv.app.state.runtime.generation
    steps = gen.steps
    path, base = ("/v1/chat/completions", CHAT) if route == "chat" else ("/v1/completions", COMPLETION)
    with srv.client() as c:
        for stream in (False, True):
            r = c.post(path, json={**base, **change, "stream": stream})
            assert r.status_code == status, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert says.lower() in r.json()["detail"].lower(), r.json()["detail"]
    assert gen.steps == steps and gen.idle


def test_good_input_still_works(srv: Running) -> None:
    with srv.client() as c:
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        r = c.post("/v1/embeddings", json={"model": "lora", "input": "the movie"})
        assert r.status_code == 422 and "causal language model" in r.json()["detail"]


def test_an_encoder_only_backbone_says_why_it_cannot_complete(tiny_model_dir: Path, tmp_path: Path) -> None:
    with serve(settings_for(tiny_model_dir, tmp_path)) as running, running.client() as c:
        for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            r = c.post(path, json={**body, "model": tiny_model_dir.name})
            assert r.status_code == 422 and "encoder-only" in r.json()["detail"] and "bert" in r.json()["detail"]
        assert c.get("/v1/models").json()["data"][0]["id"] == tiny_model_dir.name


def test_a_backbone_without_a_chat_template_refuses_chat(lm_dirs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "no-template"
    shutil.copytree(lm_dirs["gpt2"], folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    import json

    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    with serve(settings_for(folder, tmp_path / "store", torch_threads=1)) as running, running.client() as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "model": folder.name})
        assert r.status_code == 422 and "no chat template" in r.json()["detail"]
        assert c.post("/v1/completions", json={**COMPLETION, "model": folder.name}).status_code == 200


def test_in_process_model_generates_the_same(lm_dirs: dict[str, Path], lm_adapters: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    """inference_worker=false: the generator runs on the inference thread of the server process."""
    solo = SoloReference(lm_dirs["gpt2"])
    methods = ("lora", "prefix_tuning", "compacter++", "par_bn")
    want = [solo.text("once upon a time", lm_adapters[("gpt2", m)], 8) for m in methods]
    settings = settings_for(lm_dirs["gpt2"], tmp_path, torch_threads=1, inference_worker=False)
    with serve(settings) as running, running.client() as c:
        for m in methods:
            assert upload_files(c, f"m{methods.index(m)}", lm_adapters[("gpt2", m)]).status_code == 201
        body = {"prompt": "once upon a time", "max_tokens": 8, "temperature": 0}
        with ThreadPoolExecutor(len(methods)) as pool:
            got = list(pool.map(lambda i: c.post("/v1/completions", json={**body, "model": f"m{i}"}).json(), range(len(methods))))
        assert [g["choices"][0]["text"] for g in got] == want
        embed = c.post("/v1/infer", json={"inputs": ["x"], "adapters": "m0"})
        assert embed.status_code == 200  # the batcher and the generator share the inference thread
