"""Generation on encoder-decoder backbones through a real server: greedy completions equal the library's solo generate
for every method on a tiny T5 and a tiny BART, also when requests on different adapters run all at once (rows at
different decoder positions in one step); streaming, cancellation, the limits of encoder and decoder, embeddings from
the encoder; the KV budget counts prompts (cross-attention) and new tokens (self-attention) as two rectangles."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from server.execution.generator import KVShape, Sampling
from server.scheduling import generation as gen
from server.scheduling.detokenize import Detokenizer
from tests.server.conftest import Running
from tests.server.gen_support import SEQ2SEQ_METHODS, SoloReference, make_lm, make_lm_adapters
from tests.server.test_generation import _name, check_streamed_completion, complete, serve_adapters
from tests.server.test_generation_scheduling import check_a_disconnected_stream_frees_its_cache

PROMPTS = ["the movie was", "once upon a time a small robot", "what is the capital of france?"]
MAX_TOKENS = 10


@pytest.fixture(scope="module", params=["t5", "bart"])
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model_dir(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lm(tmp_path_factory.mktemp("s2s") / arch, arch)


@pytest.fixture(scope="module")
def adapters(arch: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    made = make_lm_adapters({arch: model_dir}, SEQ2SEQ_METHODS, tmp_path_factory.mktemp("s2s-adapters"))
    return {method: folder for (_, method), folder in made.items()}


@pytest.fixture(scope="module")
def srv(model_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with serve_adapters(model_dir, tmp_path_factory.mktemp("store"), adapters) as running:
        yield running


@pytest.fixture(scope="module")
def solo(model_dir: Path) -> SoloReference:
    return SoloReference(model_dir)


def _model(srv: Running, method: str | None) -> str:
    return Path(srv.settings.model_path).name if method is None else _name(method)


def test_every_method_equals_solo_generate(srv: Running, solo: SoloReference, adapters: dict[str, Path]) -> None:
    texts = set()
    with srv.client() as c:
        for method in (None, *SEQ2SEQ_METHODS):
            for prompt in PROMPTS[:2]:
                r = complete(c, _model(srv, method), prompt)
                assert r.status_code == 200, r.text
                body = r.json()
                want = solo.text(prompt, None if method is None else adapters[method], MAX_TOKENS)
                assert body["choices"][0]["text"] == want, (method, prompt)
                assert body["usage"]["prompt_tokens"] == len(solo.tok(prompt)["input_ids"])
                texts.add(want)
    assert len(texts) >= 8  # the adapters change what is generated


def test_concurrent_requests_on_different_adapters_each_equal_solo(srv: Running, solo: SoloReference,
                                                                   adapters: dict[str, Path]) -> None:
    cases = [(m, p) for m in (None, *SEQ2SEQ_METHODS) for p in PROMPTS]
    want = [solo.text(p, None if m is None else adapters[m], 16) for m, p in cases]
    with srv.client() as c, ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda case: complete(c, _model(srv, case[0]), case[1], max_tokens=16), cases))
    assert [r.json()["choices"][0]["text"] for r in responses] == want
    assert srv.app.state.runtime.generation.peak_running > 2  # they shared steps


def test_streamed_text_equals_non_streamed(srv: Running) -> None:
    with srv.client() as c:
        for method in ("prefix-tuning", "ia3"):
            for prompt in PROMPTS:
                check_streamed_completion(c, method, prompt)


def test_a_disconnected_stream_leaves_and_frees_its_cache(srv: Running) -> None:
    check_a_disconnected_stream_frees_its_cache(srv, "lora")


def test_refusals_say_why(srv: Running, arch: str) -> None:
    limit = 512 if arch == "t5" else 256  # T5: its pretraining length; BART: max_position_embeddings
    with srv.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "lora", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 422 and "chat template" in r.json()["detail"]
        r = c.post("/v1/completions", json={"model": "lora", "prompt": [5] * (limit + 1), "max_tokens": 4})
        assert r.status_code == 422 and f"{limit + 1} tokens" in r.json()["detail"] and str(limit) in r.json()["detail"]
        r = c.post("/v1/completions", json={"model": "lora", "prompt": "the movie", "max_tokens": limit + 1})
        assert r.status_code == 422 and f"max_tokens is {limit + 1}" in r.json()["detail"]
        assert f"at most {limit} tokens" in r.json()["detail"]
        assert srv.app.state.runtime.generation.waiting == 0


def test_embeddings_mean_pool_the_encoder(srv: Running, solo: SoloReference, adapters: dict[str, Path]) -> None:
    from adapters_core import AdapterSetup, mean_pool

    texts = PROMPTS[:2]
    with srv.client() as c:
        r = c.post("/v1/embeddings", json={"model": "lora", "input": texts})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    solo.model.load_adapter(str(adapters["lora"]), load_as="emb")
    try:
        enc = solo.tok(texts, padding=True, return_tensors="pt")
        with torch.inference_mode(), AdapterSetup("emb"):
            hidden = solo.model.get_encoder()(**enc).last_hidden_state
        want = mean_pool(hidden, enc["attention_mask"]).numpy()
    finally:
        solo.model.delete_adapter("emb")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_an_encoder_decoder_budget_holds_the_longest_prompt_plus_the_longest_max_tokens() -> None:
    shape = KVShape(layers=2, kv_heads=4, head_dim=32, itemsize=4)

    def admitted(encoder_decoder: bool) -> int:
        limits = gen.GenerationLimits(shape.bytes(2, 150), 8, 8, 16, 60.0, encoder_decoder)
        scheduler = gen.GenerationScheduler(None, None, None, None, shape, limits)  # type: ignore[arg-type]
        for prompt, new in ((100, 10), (10, 100)):  # 110 tokens each; 2 x (100 + 100) side by side
            seq = gen.Sequence(0, [5] * prompt, None, new, Sampling(), Detokenizer(str, ()), asyncio.Queue(), "t")
            scheduler._waiting.append(seq)
        return len(scheduler._admissible())

    assert admitted(encoder_decoder=False) == 2  # one context: rows x the longest prompt + max_tokens
    assert admitted(encoder_decoder=True) == 1  # prompts and new tokens fill buffers of their own
