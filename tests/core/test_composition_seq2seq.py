"""Compositions on the encoder-decoders: Stack, Average, BatchSplit (generation row by row), Parallel, Fuse."""

from __future__ import annotations

import functools

import pytest
import torch

from adapters_core import Average, BatchSplit, Fuse, Parallel, Split, Stack

from .conftest import add_noise
from .test_methods_seq2seq import METHODS
from .tiny_seq2seq import build_seq2seq, generate, logits, seq2seq_inputs

ARCHS = ("t5", "bart")


@functools.cache
def _zoo(arch: str, attn: str = "eager") -> torch.nn.Module:
    """Every method of test_methods_seq2seq as a noisy adapter named like its key ("+" -> "p"; never mutated), plus a second
    LoRA `lora_b` and a second seq_bn `seq_bn_b`, fused as Fuse('seq_bn', 'seq_bn_b')."""
    model = build_seq2seq(arch, attn=attn)
    for seed, (name, config) in enumerate([*METHODS.items(), ("lora_b", "lora"), ("seq_bn_b", "seq_bn")]):
        name = _name(name)
        model.add_adapter(name, config)
        add_noise(model, name, sigma=0.3, seed=seed + 10)
    model.add_adapter_fusion(Fuse("seq_bn", "seq_bn_b"))
    return model


def _name(method: str) -> str:
    return method.replace("+", "p")


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("setup", [Stack("seq_bn", "double_seq_bn"), Stack("prefix_tuning", "lora"),
                                   Stack("compacterpp", "ia3"), Average("lora", "lora_b"),
                                   Average("seq_bn", "double_seq_bn"), Fuse("seq_bn", "seq_bn_b")], ids=repr)
def test_composition_changes_logits_and_generates_with_the_cache(arch: str, setup: object) -> None:
    model, x = _zoo(arch), seq2seq_inputs()
    out = logits(model, x, setup)
    for name in setup.flatten():
        assert _differs(out, logits(model, x, name)), f"{setup!r} is just {name!r}"
    assert torch.equal(generate(model, x, setup), generate(model, x, setup, use_cache=False))


@pytest.mark.device_check
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_split_generates_each_row_as_alone(arch: str, attn: str) -> None:
    """One padded batch, one row per method (and a bare row), each with its own source length."""
    model = _zoo(arch, attn)
    names = [*map(_name, METHODS), None]
    n = len(names)
    x = seq2seq_inputs(batch=n, src=9, pad_last=0)
    lengths = [9 - i % 5 for i in range(n)]
    pad = model.config.pad_token_id
    for i, length in enumerate(lengths):
        x["attention_mask"][i, length:] = 0
        x["input_ids"][i, length:] = pad
    got = generate(model, x, BatchSplit(*names, batch_sizes=[1] * n))
    for i, name in enumerate(names):
        row = {k: v[i:i + 1, :lengths[i]] for k, v in x.items() if k != "decoder_input_ids"}
        assert torch.equal(got[i:i + 1], generate(model, row, name)), f"row {i} ({name})"
    mixed = logits(model, x, BatchSplit(*names, batch_sizes=[1] * n))
    for i, name in enumerate(names):
        alone = logits(model, {k: v[i:i + 1] for k, v in x.items()}, name)
        assert float((mixed[i:i + 1] - alone).abs().max()) < 5e-5, f"row {i} ({name})"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pair", [("seq_bn", "lora"), ("prefix_tuning", "lora"), ("mam", "compacter")])
def test_parallel_replicates_the_batch(arch: str, pair: tuple[str, str]) -> None:
    model, x = _zoo(arch), seq2seq_inputs()
    out = logits(model, x, Parallel(*pair))
    assert out.shape[0] == 2 * x["input_ids"].shape[0]
    for i, name in enumerate(pair):
        assert float((out[3 * i:3 * i + 3] - logits(model, x, name)).abs().max()) < 1e-5


def test_parallel_generate_is_refused() -> None:
    with pytest.raises(ValueError, match="generate\\(\\) with Parallel is not supported"):
        generate(_zoo("t5"), seq2seq_inputs(), Parallel("seq_bn", "lora"))


def test_split_is_refused_on_encoder_decoders() -> None:
    with pytest.raises(ValueError, match="not supported on encoder-decoders"):
        logits(_zoo("bart"), seq2seq_inputs(), Split("seq_bn", "double_seq_bn", splits=[3, 4]))
