"""The generation scheduler's own KV cache holds each sequence's prefix (server.execution.generator): written once at
its first prefill, never prepended again. Rows with different prefixes (or none, or prefixes in compositions) in one
step generate what the library's solo generate() does, with the logits of the prepending path, on a tiny Llama (GQA,
RoPE) and a tiny GPT-2 (fused c_attn, learned positions). A sequence whose adapter raises ends alone with an error,
at prefill or at decode, while the others go on; the KV metric reports the bytes in use."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_core import AdapterSetup, Stack
from adapters_core.methods.prefix_tuning.routing import PrefixState
from adapters_core.routing import ForwardContext
from server.execution.engine import Engine
from server.execution.generator import Generator, Limits, Sampling, SeqSpec
from tests.server.conftest import serve, settings_for, upload_files
from tests.server.gen_support import load_lm, make_lm_adapter
from tests.server.test_generation_scheduling import Stream, metric, wait_for

MAX_TOKENS = 8
GREEDY = Sampling(temperature=0, ignore_eos=True)
EXTRA = {"p5": "prefix_tuning[prefix_length=5]", "pleave": "prefix_tuning[prefix_length=7,leave_out=[0]]"}
LIMITS = Limits(budget_bytes=64 << 20, max_rows=16)

# (prompt, composition over the names loaded below); "pleave" has no prefix at layer 0: the wrapper still prepends it
CASES: list[tuple[str, Any]] = [
    ("the movie was", "p30"),
    ("once upon a time a small robot learned", "p5"),
    ("what is the capital", None),
    ("hello there", Stack("p30", "lora")),
    ("a very boring film with a sad", Stack("p5", "seqbn")),
    ("the music was good", "pleave"),
    ("once upon", Stack("p5", "p30")),
    ("the movie", "lora"),
]
CACHED = [i for i, (_, block) in enumerate(CASES) if block != "pleave"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def folders(family: str, lm_dirs: dict[str, Path], lm_adapters: dict[tuple[str, str], Path],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp(f"prefix-cache-{family}")
    out = {"p30": lm_adapters[(family, "prefix_tuning")], "lora": lm_adapters[(family, "lora")],
           "seqbn": lm_adapters[(family, "seq_bn")], "bad": lm_adapters[(family, "ia3")]}
    for i, (name, config) in enumerate(EXTRA.items()):
        out[name] = make_lm_adapter(lm_dirs[family], root / name, config, 300 + i)
    return out


@pytest.fixture(scope="module")
def engine(family: str, lm_dirs: dict[str, Path], folders: dict[str, Path]) -> Engine:
    eng = Engine(str(lm_dirs[family]), device="cpu", threads=1)
    for name, folder in folders.items():
        eng.load(folder, name)
    return eng


class Reference:
    """The library's generate() (HF's KV cache; the wrapper prepends prefixes at every step) over the same adapters."""

    def __init__(self, folder: Path, adapters: dict[str, Path]) -> None:
        from transformers import PreTrainedTokenizerFast

        self.model = load_lm(folder)
        self.tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
        for name, path in adapters.items():
            self.model.load_adapter(str(path), load_as=name)

    def prompt(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text)["input_ids"])

    def ids(self, text: str, block: Any, n: int = MAX_TOKENS) -> list[int]:
        ids = torch.tensor([self.prompt(text)])
        with torch.inference_mode(), AdapterSetup(block):
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, use_cache=True, pad_token_id=self.tok.pad_token_id)
        return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def reference(lm_dirs: dict[str, Path], family: str, folders: dict[str, Path]) -> Reference:
    return Reference(lm_dirs[family], folders)


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None


def run(engine: Engine, admissions: list[list[SeqSpec]], limits: Limits = LIMITS,
        after_step: Callable[[Any], None] | None = None) -> dict[int, Outcome]:
    """Step the generator until nothing runs; admissions[k] is admitted at step k."""
    engine.generation_reset()
    out: dict[int, Outcome] = {}
    step = 0
    while True:
        result = engine.generation_step(admissions[step] if step < len(admissions) else [], [], limits)
        for ev in result.events:
            o = out.setdefault(ev.id, Outcome())
            if ev.token is not None:
                o.tokens.append(ev.token)
            o.finish, o.error = ev.finish or o.finish, ev.error or o.error
        if after_step is not None:
            after_step(result)
        step += 1
        if result.running == 0 and step >= len(admissions):
            return out


def specs(reference: Reference, indices: list[int]) -> list[SeqSpec]:
    return [SeqSpec(i, reference.prompt(CASES[i][0]), CASES[i][1], MAX_TOKENS, GREEDY) for i in indices]


@pytest.fixture
def prepends(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Per attention call that got prefixes prepended by the wrapper: how many rows carried one."""
    seen: list[int] = []
    original = PrefixState.prefix_for

    def counting(self: PrefixState, location: str, layer: int, batch: int) -> Any:
        found = original(self, location, layer, batch)
        if found is not None:
            seen.append(int(found[2].any(dim=1).sum()))
        return found

    monkeypatch.setattr(PrefixState, "prefix_for", counting)
    return seen


@pytest.mark.parametrize("chunk", [512, 4], ids=["prefilled-together", "chunked-and-staggered"])
def test_rows_with_different_prefixes_equal_the_librarys_generate(engine: Engine, reference: Reference, chunk: int,
                                                                  prepends: list[int]) -> None:
    every = list(range(len(CASES)))
    admissions = [specs(reference, every)] if chunk == 512 else [specs(reference, every[:2]), specs(reference, every[2:5]),
                                                                 [], specs(reference, every[5:])]
    got = run(engine, admissions, Limits(LIMITS.budget_bytes, LIMITS.max_rows, chunk))
    for i, (prompt, block) in enumerate(CASES):
        assert got[i].error is None and got[i].tokens == reference.ids(prompt, block), (i, block)
    # only the leave_out row's prefix is still prepended (at its one layer); every other prefix came from the cache
    assert prepends and set(prepends) == {1}


def test_prefixes_are_written_once_and_logits_equal_the_prepending_path(
        engine: Engine, reference: Reference, prepends: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    logits: dict[tuple[int, int], torch.Tensor] = {}
    emit = Generator._emit_tokens

    def recording(self: Generator, seqs: list[Any], rows: torch.Tensor) -> Any:
        for seq, row in zip(seqs, rows, strict=True):
            logits[(seq.spec.id, seq.generated)] = row.clone()
        return emit(self, seqs, rows)

    monkeypatch.setattr(Generator, "_emit_tokens", recording)
    cached = run(engine, [specs(reference, CACHED)])
    assert prepends == []  # neither prefill nor any decode step prepended a prefix
    new = dict(logits)
    logits.clear()
    monkeypatch.setattr(engine.model, "cached_prefix", lambda *a, **k: None)  # the path before: prepend every forward
    prepending = run(engine, [specs(reference, CACHED)])
    assert len(prepends) >= 2 * MAX_TOKENS  # every layer of every forward
    assert {i: o.tokens for i, o in cached.items()} == {i: o.tokens for i, o in prepending.items()}
    assert new.keys() == logits.keys() and len(new) == len(CACHED) * MAX_TOKENS
    for key, row in new.items():
        assert torch.allclose(row, logits[key], atol=1e-4, rtol=1e-4), (key, (row - logits[key]).abs().max())


def test_kv_bytes_in_use_count_prefixes_and_tokens(engine: Engine, reference: Reference) -> None:
    seen: list[tuple[int, int]] = []
    prompt = reference.prompt(CASES[0][0])
    run(engine, [specs(reference, [0])], after_step=lambda r: seen.append((r.kv_used_bytes, r.kv_bytes)))
    token_bytes = engine._generator.shape.token_bytes  # type: ignore[union-attr]
    # step k (prefill, then the decode of the same step): the 30 prefix columns, the prompt and k fed tokens
    assert [u for u, _ in seen[:-1]] == [(30 + len(prompt) + k) * token_bytes for k in range(1, MAX_TOKENS - 1)]
    assert all(u <= a for u, a in seen) and seen[-1] == (0, 0)


# -- one sequence's error ------------------------------------------------------------------------------------------
@pytest.fixture
def raising(engine: Engine) -> Iterator[dict[str, Any]]:
    """Layer 0's MLP raises in forwards that route adapter "bad", when `when(query_length)` says so."""
    control: dict[str, Any] = {"when": lambda q: True, "raised": 0}
    mlp = engine.model.base_model.layers[0].mlp if hasattr(engine.model.base_model, "layers") else engine.model.base_model.h[0].mlp

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        ctx = ForwardContext.current()
        if ctx is not None and ctx.plan is not None and any("bad" in r for r in ctx.plan.rows) and control["when"](args[0].shape[1]):
            control["raised"] += 1
            raise RuntimeError("adapter 'bad' exploded")

    handle = mlp.register_forward_pre_hook(hook)
    yield control
    handle.remove()


def test_an_adapter_that_raises_at_prefill_ends_only_its_sequence(engine: Engine, reference: Reference,
                                                                  raising: dict[str, Any]) -> None:
    raising["when"] = lambda q: q > 1
    bad = SeqSpec(100, reference.prompt("the movie was"), Stack("p5", "bad"), MAX_TOKENS, GREEDY)
    long_bad = SeqSpec(101, reference.prompt(CASES[1][0]), "bad", MAX_TOKENS, GREEDY)  # 19 tokens: chunked
    first, together = specs(reference, [2, 3]), specs(reference, [0, 7])  # 5 + 4 tokens; 6 + 5 (+ 6 of bad)
    got = run(engine, [first, [together[0], bad, together[1]], [long_bad]], Limits(LIMITS.budget_bytes, 16, 18))
    assert raising["raised"] >= 3  # the shared prefill, the bad one alone, the long one's first chunk
    for seq in (bad, long_bad):
        assert got[seq.id].finish == "error" and "exploded" in (got[seq.id].error or "") and not got[seq.id].tokens
    for i in (2, 3, 0, 7):
        assert got[i].error is None and got[i].tokens == reference.ids(*CASES[i]), i


def test_an_adapter_that_raises_at_decode_ends_only_its_sequence(engine: Engine, reference: Reference,
                                                                 raising: dict[str, Any]) -> None:
    decodes = {"n": 0}

    def third_decode(q: int) -> bool:
        decodes["n"] += q == 1
        return q == 1 and decodes["n"] >= 3

    raising["when"] = third_decode
    bad = SeqSpec(100, reference.prompt("hello there"), Stack("p30", "bad"), MAX_TOKENS, GREEDY)
    others = specs(reference, [0, 2, 4, 7])
    got = run(engine, [[others[0], others[1], bad, others[2], others[3]]])
    assert got[100].finish == "error" and "exploded" in (got[100].error or "")
    # its first prefill's token and two decode steps' tokens came before the third decode raised
    assert got[100].tokens == reference.ids("hello there", Stack("p30", "bad"))[:3]
    for i in (0, 2, 4, 7):
        assert got[i].error is None and got[i].tokens == reference.ids(*CASES[i]), i


def test_through_the_server_a_raising_adapter_fails_its_request_and_a_running_stream_goes_on(
        lm_dirs: dict[str, Path], lm_adapters: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    from tests.server.gen_support import SoloReference

    llama = lm_dirs["llama"]
    solo = SoloReference(llama)
    body = {"model": "pfx", "prompt": "the movie was", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    want = solo.text("the movie was", lm_adapters[("llama", "prefix_tuning")], 60)
    with serve(settings_for(llama, tmp_path, torch_threads=1, inference_worker=False)) as srv, srv.client() as c:
        assert upload_files(c, "pfx", lm_adapters[("llama", "prefix_tuning")]).status_code == 201
        assert upload_files(c, "bad", lm_adapters[("llama", "ia3")]).status_code == 201
        runtime = srv.app.state.runtime
        meta = runtime.store.find("default", "bad")
        assert meta is not None
        failing = threading.Event()

        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            ctx = ForwardContext.current()
            if failing.is_set() and ctx is not None and ctx.plan is not None and any(meta.internal in r for r in ctx.plan.rows):
                raise RuntimeError("adapter 'bad' exploded")

        handle = runtime.engine.model.base_model.layers[0].mlp.register_forward_pre_hook(hook)
        try:
            stream = Stream(srv, body)
            assert stream.first.wait(30)
            failing.set()
            r = c.post("/v1/completions", json={**body, "model": "bad", "max_tokens": 5})
            assert r.status_code == 500 and r.json()["type"].endswith("inference-failed") and "exploded" in r.json()["detail"]
            stream.join()
            wait_for(lambda: metric(c, "adapterserve_generation_running_sequences") == 0)
            assert metric(c, "adapterserve_kv_cache_used_bytes") == 0
        finally:
            handle.remove()
    assert stream.done.is_set() and not stream.errors and stream.text.startswith(want)  # it went on past any EOS


def test_a_sampling_error_ends_only_its_sequence(engine: Engine, reference: Reference,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import server.execution.generator as generator

    def broken(logits: torch.Tensor, p: Sampling, rng: torch.Generator) -> int:
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    monkeypatch.setattr(generator, "sample_row", broken)
    sampled = SeqSpec(100, reference.prompt("hello there"), "p30", MAX_TOKENS, Sampling(temperature=1.0, seed=3))
    greedy = specs(reference, [0, 2])
    got = run(engine, [[greedy[0], sampled, greedy[1]]])
    assert got[100].finish == "error" and "probability" in (got[100].error or "") and not got[100].tokens
    for i in (0, 2):
        assert got[i].error is None and got[i].tokens == reference.ids(*CASES[i]), i
