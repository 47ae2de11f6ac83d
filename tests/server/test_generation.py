"""Generation through a real server: greedy completions equal the library's solo generate for every method on a tiny
Llama and a tiny GPT-2, concurrent mixed-adapter requests, streaming, the official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import Running, serve, settings_for, upload_files
from tests.server.gen_support import METHODS, SoloReference

PROMPTS = ["the movie was", "once upon a time a small", "what is the capital"]
MAX_TOKENS = 10


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextmanager
def serve_adapters(model_dir: Path, store: Path, adapters: dict[str, Path]) -> Iterator[Running]:
    """A real server on `model_dir` with every adapter (method -> folder) uploaded under its method's name."""
    settings = settings_for(model_dir, store, prefill_chunk_tokens=16, torch_threads=1)
    with serve(settings) as running:
        with running.client() as c:
            for method, folder in adapters.items():
                r = upload_files(c, _name(method), folder)
                assert r.status_code == 201, r.text
        yield running


@pytest.fixture(scope="module")
def gen_srv(family: str, lm_dirs: dict[str, Path], lm_adapters: dict[tuple[str, str], Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    adapters = {method: lm_adapters[(family, method)] for method in METHODS}
    with serve_adapters(lm_dirs[family], tmp_path_factory.mktemp(f"store-{family}"), adapters) as running:
        yield running


@pytest.fixture(scope="module")
def solo(family: str, lm_dirs: dict[str, Path]) -> SoloReference:
    return SoloReference(lm_dirs[family])


def _name(method: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in method).strip("-")


def complete(c: httpx.Client, model: str, prompt: str, **kw: object) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **kw})


def stream_text(c: httpx.Client, path: str, body: dict[str, object]) -> tuple[str, list[dict[str, object]]]:
    events: list[dict[str, object]] = []
    text = ""
    with c.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        ev = json.loads(line[6:])
        events.append(ev)
        for ch in ev.get("choices", []):
            text += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
    return text, events


def test_every_method_equals_solo_generate(gen_srv: Running, family: str, solo: SoloReference,
                                           lm_adapters: dict[tuple[str, str], Path]) -> None:
    backbone = Path(gen_srv.settings.model_path).name
    with gen_srv.client() as c:
        for method in (None, *METHODS):
            adapter = None if method is None else lm_adapters[(family, method)]
            for prompt in PROMPTS[:2]:
                r = complete(c, backbone if method is None else _name(method), prompt)
                assert r.status_code == 200, r.text
                body = r.json()
                want = solo.text(prompt, adapter, MAX_TOKENS)
                assert body["choices"][0]["text"] == want, (method, prompt)
                assert body["usage"]["prompt_tokens"] == len(solo.tok(prompt)["input_ids"])


def test_concurrent_requests_on_different_adapters_each_equal_solo(gen_srv: Running, family: str, solo: SoloReference,
                                                                   lm_adapters: dict[tuple[str, str], Path]) -> None:
    backbone = Path(gen_srv.settings.model_path).name
    cases = [(m, p) for m in (None, *METHODS) for p in PROMPTS]
    want = [solo.text(p, None if m is None else lm_adapters[(family, m)], MAX_TOKENS) for m, p in cases]
    with gen_srv.client() as c, ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda case: complete(c, backbone if case[0] is None else _name(case[0]), case[1]), cases))
    got = [r.json()["choices"][0]["text"] for r in responses]
    assert got == want
    assert gen_srv.app.state.runtime.generation.peak_running > 1  # they shared steps


def test_streamed_text_equals_non_streamed(gen_srv: Running) -> None:
    with gen_srv.client() as c:
        for prompt in PROMPTS:
            check_streamed_completion(c, "lora", prompt)
            chat = {"model": "prefix-tuning", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0}
            plain = c.post("/v1/chat/completions", json=chat).json()
            assert plain["object"] == "chat.completion" and plain["choices"][0]["message"]["role"] == "assistant"
            text, events = stream_text(c, "/v1/chat/completions", chat)
            assert text == plain["choices"][0]["message"]["content"]
            assert events[0]["choices"][0]["delta"]["role"] == "assistant"


def check_streamed_completion(c: httpx.Client, model: str, prompt: str) -> None:
    """The streamed completion's text, usage and finish_reason are the plain JSON answer's."""
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream_options": {"include_usage": True}}
    plain = c.post("/v1/completions", json=body).json()
    text, events = stream_text(c, "/v1/completions", body)
    assert text == plain["choices"][0]["text"]
    assert events[-1]["usage"] == plain["usage"] and events[-1]["choices"] == []
    finishes = [ch["finish_reason"] for ev in events for ch in ev["choices"] if ch["finish_reason"]]
    assert finishes == [plain["choices"][0]["finish_reason"]]


def test_chat_uses_the_chat_template(gen_srv: Running, family: str, solo: SoloReference,
                                     lm_adapters: dict[tuple[str, str], Path]) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ids = solo.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    want = solo.tok.decode(solo.ids(list(ids), lm_adapters[(family, "ia3")], MAX_TOKENS), skip_special_tokens=True)
    with gen_srv.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "ia3", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == want
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_finish_reasons_max_tokens_and_token_id_prompts(gen_srv: Running, solo: SoloReference) -> None:
    with gen_srv.client() as c:
        r = c.post("/v1/completions", json={"model": "lora", "prompt": "the movie was", "max_tokens": 3, "temperature": 0,
                                            "ignore_eos": True})
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
        ids = solo.tok("the movie was")["input_ids"]
        by_ids = c.post("/v1/completions", json={"model": "lora", "prompt": ids, "max_tokens": 3, "temperature": 0,
                                                 "ignore_eos": True}).json()
        assert by_ids["choices"][0]["text"] == body["choices"][0]["text"]
        several = c.post("/v1/completions", json={"model": "lora", "prompt": PROMPTS, "max_tokens": 3, "temperature": 0,
                                                  "ignore_eos": True}).json()
        assert [ch["index"] for ch in several["choices"]] == [0, 1, 2]
        assert several["choices"][0]["text"] == body["choices"][0]["text"]
        assert several["usage"]["completion_tokens"] == 9


def test_stop_strings_also_across_token_boundaries(gen_srv: Running, family: str, solo: SoloReference,
                                                   lm_adapters: dict[tuple[str, str], Path]) -> None:
    prompt = "once upon a time"
    ids = solo.ids(solo.tok(prompt)["input_ids"], lm_adapters[(family, "seq_bn")], 24)
    full = solo.tok.decode(ids, skip_special_tokens=True)
    bounds = [len(solo.tok.decode(ids[:k], skip_special_tokens=True)) for k in range(1, len(ids))]
    # a stop string whose first occurrence starts in one token and ends in the next
    b = next(b for b in bounds if 0 < b < len(full) and full.find(full[b - 1 : b + 1]) == b - 1)
    stop = full[b - 1 : b + 1]
    base = {"model": "seq-bn", "prompt": prompt, "max_tokens": 24, "temperature": 0}
    with gen_srv.client() as c:
        assert c.post("/v1/completions", json=base).json()["choices"][0]["text"] == full
        for stream in (False, True):
            body = {**base, "stop": [stop, "never-seen-here"]}
            if stream:
                text, events = stream_text(c, "/v1/completions", body)
                finish = [ch["finish_reason"] for ev in events for ch in ev["choices"] if ch["finish_reason"]][0]
            else:
                choice = c.post("/v1/completions", json=body).json()["choices"][0]
                text, finish = choice["text"], choice["finish_reason"]
            assert (text, finish) == (full[: b - 1], "stop")


def test_same_seed_same_text(gen_srv: Running) -> None:
    body = {"model": "lora", "prompt": "the movie was", "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "top_k": 50,
            "seed": 1234, "ignore_eos": True}
    with gen_srv.client() as c:
        texts = {c.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(3)}
        assert len(texts) == 1
        others = {c.post("/v1/completions", json={**body, "seed": s}).json()["choices"][0]["text"] for s in range(5)}
        assert len(others) > 1


def test_the_official_openai_client_streams_a_chat_completion(gen_srv: Running) -> None:
    import openai

    client = openai.OpenAI(base_url=gen_srv.url + "/v1", api_key="unused-in-open-mode")
    models = [m.id for m in client.models.list()]
    backbone = Path(gen_srv.settings.model_path).name
    assert models[0] == backbone and "lora" in models
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model="lora", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="lora", messages=messages, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    done = client.completions.create(model=backbone, prompt="the movie was", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length")


def test_compositions_generate_as_the_library_does_also_beside_single_adapters(
        gen_srv: Running, family: str, solo: SoloReference, lm_adapters: dict[tuple[str, str], Path]) -> None:
    from adapters_core import Average, Stack

    a = {"sa": lm_adapters[(family, "seq_bn")], "sb": lm_adapters[(family, "lora")]}
    p = lm_adapters[(family, "prefix_tuning")]  # its prefix sits in the scheduler's KV cache, written once
    cases = [
        ({"stack": ["seq-bn", "lora"]}, Stack("sa", "sb"), a),
        ({"average": ["lora", "ia3"], "weights": [0.7, 0.3]},
         Average("sb", "si", weights=[0.7, 0.3]), {"sb": a["sb"], "si": lm_adapters[(family, "ia3")]}),
        ({"stack": ["prefix-tuning", "lora"]}, Stack("sp", "sb"), {"sp": p, "sb": a["sb"]}),
        ({"stack": ["prefix-tuning", "seq-bn"]}, Stack("sp", "sa"), {"sp": p, "sa": a["sa"]}),
    ]
    prompt = "the movie was"
    want = [solo.composed(prompt, folders, setup, MAX_TOKENS) for _, setup, folders in cases]
    want_single = solo.text(prompt, lm_adapters[(family, "par_bn")], MAX_TOKENS)
    with gen_srv.client() as c, ThreadPoolExecutor(2 * len(cases) + 2) as pool:
        bodies = [("x", {"adapters": spec}) for spec, _, _ in cases] * 2 + [("par-bn", {})] * 2
        got = list(pool.map(lambda b: complete(c, b[0], prompt, **b[1]), bodies))
    texts = [r.json()["choices"][0]["text"] for r in got]
    assert texts == want * 2 + [want_single] * 2
