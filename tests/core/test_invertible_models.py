"""Invertible adapters on the tiny backbones (tests/core/tiny_models.py: BERT, GPT-2, grouped-query Llama),
NICE and GLOW: where the block acts (checked against a hand-made hook on the module AdapterHub hooks), the
inverse before an LM head, mixed batches in one forward, Stack's first adapter, AdapterHub's key names in
saved files, save -> load, delete and train_adapter. (test_methods.py runs the generic method checks on
seq_bn_inv and double_seq_bn_inv[glow] as well.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from adapters_core import AdapterSetup, BatchSplit, Parallel, Stack, init

from .tiny_models import ARCHS, DECODERS, add_noise, build, hidden_states, make_ids, max_abs, run, tiny_config

KINDS = ("nice", "glow")
CONFIG = {"nice": "seq_bn_inv", "glow": "double_seq_bn_inv[inv_adapter=glow]"}
PLAIN = {"nice": "seq_bn", "glow": "double_seq_bn"}
#: The module whose output AdapterHub passes through the invertible adapter (its embedding hook).
EMBEDDING_OUTPUT = {"bert": "embeddings", "gpt2": "drop", "llama": "embed_tokens"}
TOL = 1e-5


def _inputs(batch: int = 4, seq: int = 6) -> dict[str, torch.Tensor]:
    ids = make_ids(batch, seq)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _rows(inputs: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in inputs.items()}


def _with(model: nn.Module, name: str, config: str, seed: int) -> nn.Module:
    model.add_adapter(name, config)
    add_noise(model, model.adapter_parameters(name), seed)
    return model


def _block(model: nn.Module, name: str) -> nn.Module:
    return model.adapter_base.invertible_adapters[name]


def _copy_bottleneck(src: nn.Module, dst: nn.Module, name: str) -> None:
    """dst's plain bottleneck adapter `name` takes src's bottleneck weights (same keys)."""
    state = src.adapter_state_dict(name)
    with torch.no_grad():
        for key, p in dst.adapter_named_parameters(name):
            p.copy_(state[key])


@contextmanager
def _by_hand(model: nn.Module, arch: str, block: nn.Module) -> Iterator[None]:
    """`block` on the output of the module AdapterHub hooks, attached by hand."""
    module = getattr(model.adapter_base, EMBEDDING_OUTPUT[arch])
    handle = module.register_forward_hook(lambda mod, args, out: block(out))
    try:
        yield
    finally:
        handle.remove()


def _forward_count(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.adapter_base.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    return calls


# -- where the block acts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_block_acts_on_the_embedding_output(arch: str, kind: str) -> None:
    model = _with(build(arch), "x", CONFIG[kind], seed=1)
    hand = _with(build(arch), "x", PLAIN[kind], seed=1)
    _copy_bottleneck(model, hand, "x")
    x = _inputs()
    got = run(model, x, "x")
    with _by_hand(hand, arch, _block(model, "x")):
        want = run(hand, x, "x")
    assert max_abs(got, want) < TOL
    assert max_abs(got, run(hand, x, "x")) > 1e-3, "the block changes the output"
    assert torch.equal(run(model, x), run(build(arch), x)), "inactive: the bare backbone"


# -- the inverse before an LM head ---------------------------------------------------------------------------


def _causal_lm(arch: str, config: str | None) -> nn.Module:
    torch.manual_seed(0)
    model = init(AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager")).eval()
    return _with(model, "x", config, seed=1) if config else model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", DECODERS)
def test_lm_head_of_a_causal_lm_sees_the_inverse(arch: str, kind: str) -> None:
    """init()'d *ForCausalLM: logits = lm_head(block^-1(final states)), the block applied after the embeddings."""
    model = _causal_lm(arch, CONFIG[kind])
    hand = _causal_lm(arch, PLAIN[kind])
    _copy_bottleneck(model, hand, "x")
    block = _block(model, "x")
    x = _inputs()
    with torch.no_grad(), AdapterSetup("x"):
        got = model(**x).logits
        with _by_hand(hand, arch, block):
            final = hand(**x, output_hidden_states=True).hidden_states[-1]
        want = hand.lm_head(block(final, rev=True))
        plain_head = hand.lm_head(final)
    assert max_abs(got, want) < TOL
    assert max_abs(want, plain_head) > 1e-3, "the inverse changes the logits"


@pytest.mark.parametrize("arch", DECODERS)
def test_cached_generate_equals_full_forwards(arch: str) -> None:
    """generate() with the KV cache: each step's new token gets the block, the LM head the inverse."""
    model = _causal_lm(arch, CONFIG["glow"])
    ids = make_ids(2, 4)
    with torch.no_grad(), AdapterSetup("x"):
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
        want = ids
        for _ in range(5):
            logits = model(input_ids=want, attention_mask=torch.ones_like(want), use_cache=False).logits
            want = torch.cat([want, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", DECODERS)
def test_causal_lm_heads_of_an_adapter_model_see_each_rows_inverse(arch: str) -> None:
    """AdapterModel causal_lm heads under BatchSplit: each head's rows get their own adapter's inverse (and a
    head over rows without an invertible adapter gets none), in one forward."""
    model = build(arch)
    for name, config, seed in (("x", CONFIG["nice"], 1), ("y", CONFIG["glow"], 2), ("plain", "seq_bn", 3)):
        _with(model, name, config, seed)
        model.add_causal_lm_head(name)
    x = _inputs(batch=5)
    sizes = {"x": slice(0, 2), "plain": slice(2, 3), "y": slice(3, 5)}
    calls = _forward_count(model)
    with torch.no_grad(), AdapterSetup(BatchSplit("x", "plain", "y", batch_sizes=[2, 1, 2])):
        mixed = model(**x)
    assert len(calls) == 1
    for i, (name, rows) in enumerate(sizes.items()):
        with torch.no_grad(), AdapterSetup(name):
            alone = model(**_rows(x, rows)).logits
            states = model.base_model(**_rows(x, rows)).last_hidden_state
            head = model.heads[name]
            for module in list(head)[:-1]:
                states = module(states)
            if name != "plain":
                states = _block(model, name)(states, rev=True)
            want = head.output_embeddings(states)
        assert max_abs(mixed[i].logits, alone) < TOL, name
        assert max_abs(alone, want) < TOL, name


# -- mixed batches, Parallel, Stack -------------------------------------------------------------------------


def _zoo(arch: str) -> nn.Module:
    model = build(arch)
    for name, config, seed in (("a", CONFIG["nice"], 1), ("b", CONFIG["glow"], 2), ("plain", "seq_bn", 3)):
        _with(model, name, config, seed)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_is_one_forward_and_each_row_equals_its_adapter_alone(arch: str) -> None:
    model = _zoo(arch)
    x = _inputs(batch=6)
    parts = {"a": slice(0, 2), "plain": slice(2, 3), "b": slice(3, 5), None: slice(5, 6)}
    calls = _forward_count(model)
    mixed = run(model, x, BatchSplit(*parts, batch_sizes=[2, 1, 2, 1]))
    assert len(calls) == 1
    for name, rows in parts.items():
        assert max_abs(mixed[rows], run(model, _rows(x, rows), name)) < TOL, name
    scattered = BatchSplit("a", "b", "a", "plain", batch_sizes=[1, 2, 2, 1])
    out = run(model, x, scattered)
    for name, rows in (("a", slice(0, 1)), ("b", slice(1, 3)), ("a", slice(3, 5)), ("plain", slice(5, 6))):
        assert max_abs(out[rows], run(model, _rows(x, rows), name)) < TOL, (name, rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_parallel_gives_each_copy_its_own_block(arch: str) -> None:
    """Deliberately unlike AdapterHub (which applies the first child's block to every copy): copy i runs
    child i's block, so each copy equals that child alone."""
    model = _zoo(arch)
    x = _inputs(batch=2)
    calls = _forward_count(model)
    with torch.no_grad(), AdapterSetup(Parallel("a", "plain", "b")):
        out = hidden_states(model(**x))
    assert len(calls) == 1 and out.shape[0] == 6
    for i, name in enumerate(("a", "plain", "b")):
        assert max_abs(out[2 * i : 2 * i + 2], run(model, x, name)) < TOL, name


@pytest.mark.parametrize("arch", ARCHS)
def test_stack_uses_the_first_adapters_block_only(arch: str) -> None:
    """As in AdapterHub: the block of setup.first() (Stack(a, b): a's), never b's."""
    model = _zoo(arch)
    x = _inputs()
    stacked = run(model, x, Stack("a", "b"))
    blocks = model.adapter_base.invertible_adapters
    b_block = blocks["b"]
    del blocks["b"]
    try:
        assert max_abs(stacked, run(model, x, Stack("a", "b"))) < TOL
    finally:
        blocks["b"] = b_block
    assert max_abs(stacked, run(model, x, Stack("plain", "a", "b"))) > 1e-3


# -- files, delete, training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_save_writes_adapterhub_keys_and_loads_back_identical(arch: str, kind: str, tmp_path: Path) -> None:
    model = _with(build(arch), "x", CONFIG[kind], seed=1)
    x = _inputs()
    want = run(model, x, "x")
    model.save_adapter(tmp_path, "x")
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    prefix = model.adapter_base.base_model_prefix
    nets = ("F", "G") if kind == "nice" else ("s1", "s2")
    inv = sorted(k for k in saved if ".invertible_adapters." in k)
    assert inv == sorted(
        f"{prefix}.invertible_adapters.x.{net}.{i}.{part}" for net in nets for i in (0, 2) for part in ("weight", "bias")
    )
    fresh = build(arch)
    assert fresh.load_adapter(tmp_path) == "x"
    assert fresh.adapters_config["x"] == model.adapters_config["x"]
    ours, theirs = model.adapter_state_dict("x"), fresh.adapter_state_dict("x")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(run(fresh, x, "x"), want)


@pytest.mark.parametrize("arch", ARCHS)
def test_delete_removes_the_block(arch: str) -> None:
    model = _zoo(arch)
    never = build(arch)
    for name in ("a", "b", "plain"):
        model.delete_adapter(name)
    assert not len(model.adapter_base.invertible_adapters)
    assert sorted(k for k, _ in model.named_parameters()) == sorted(k for k, _ in never.named_parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_train_adapter_trains_only_its_weights_including_its_block(arch: str) -> None:
    model = _zoo(arch)
    trained = dict(model.adapter_named_parameters("a"))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    model.train_adapter("a")
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {
        k for k, p in model.named_parameters() if any(p is q for q in trained.values())
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    x = _inputs()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(**x).last_hidden_state.square().mean().backward()
        opt.step()
    model.eval()
    trained_keys = {k for k, p in model.named_parameters() if any(p is q for q in trained.values())}
    block_keys = {k for k, p in model.named_parameters() if any(p is q for q in _block(model, "a").parameters())}
    changed = {k for k, p in model.named_parameters() if not torch.equal(p.detach(), before[k])}
    assert block_keys and block_keys <= trained_keys
    assert block_keys <= changed, "its invertible block trains"
    assert changed - block_keys, "its bottleneck trains"
    assert changed <= trained_keys, f"nothing else moves: {sorted(changed - trained_keys)[:3]}"
