"""Tiny seeded backbones and helpers for the batching, composition-semantics and thread tests.

Owned by tests/core/test_batching.py, test_composition_semantics.py and test_threads.py (kept apart from
conftest.py, which other test files share). Every backbone is hidden 32, 2 layers, 4 heads (Llama: 2
key/value heads, i.e. grouped-query attention), built from a fixed seed with dropout off, so the same
arguments always give bit-identical weights.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from transformers import BertConfig, GPT2Config, LlamaConfig, PretrainedConfig

from adapters_core import AdapterSetup, AutoAdapterModel

VOCAB = 100
ARCHS = ("bert", "gpt2", "llama")
DECODERS = ("gpt2", "llama")
ATTNS = ("eager", "sdpa")

# Every method, sized for hidden 32 (name -> config string).
METHODS: dict[str, str] = {
    "seq_bn": "seq_bn",
    "double_seq_bn": "double_seq_bn",
    "par_bn": "par_bn",
    "compacter": "compacter[reduction_factor=8]",
    "compacter_pp": "compacter++[reduction_factor=8]",
    "prefix_tuning": "prefix_tuning[prefix_length=3,bottleneck_size=16]",
    "prefix_tuning_flat": "prefix_tuning_flat[prefix_length=2]",
    "lora": "lora",
    "ia3": "ia3",
    "mam": "prefix_tuning[prefix_length=3,bottleneck_size=16]|par_bn",
}
PREFIX_METHODS = frozenset({"prefix_tuning", "prefix_tuning_flat", "mam"})


def tiny_config(arch: str) -> PretrainedConfig:
    if arch == "bert":
        return BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, attention_dropout=0.0,
        )
    raise ValueError(arch)


def build(arch: str, attn: str = "eager", seed: int = 0) -> torch.nn.Module:
    """A tiny random AdapterModel; the same (arch, attn, seed) gives bit-identical weights."""
    torch.manual_seed(seed)
    model = AutoAdapterModel.from_config(tiny_config(arch), attn_implementation=attn)
    assert model.config._attn_implementation == attn
    return model.eval()


def add_noise(model: torch.nn.Module, params: list[torch.nn.Parameter], seed: int, sigma: float = 0.1) -> None:
    """Add N(0, sigma) to `params` so zero-initialised parts (LoRA B, par_bn up, ...) contribute."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * sigma)


def add_adapter(model: torch.nn.Module, name: str, config: str, seed: int) -> None:
    """Add adapter `name` and perturb all its parameters (seeded)."""
    model.add_adapter(name, config)
    add_noise(model, model.adapter_parameters(name), seed)


@functools.cache
def zoo(arch: str, attn: str) -> torch.nn.Module:
    """One model with one noisy adapter per method (named like METHODS' keys), plus for the
    same-method tests four distinct adapters each of seq_bn, lora, compacter_pp, ia3 and prefix_tuning
    (`<method>_0` ... `<method>_3`), and a second seq_bn `seq_bn_b`.

    Shared (cached) between tests that only run forward passes; never mutate it.
    """
    model = build(arch, attn)
    seed = 100
    for name, config in METHODS.items():
        add_adapter(model, name, config, seed)
        seed += 1
    for method in ("seq_bn", "lora", "compacter_pp", "ia3", "prefix_tuning"):
        for i in range(4):
            add_adapter(model, f"{method}_{i}", METHODS[method], seed)
            seed += 1
    return model


def make_ids(batch: int, seq: int, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def padded_inputs(arch: str, lengths: list[int], side: str = "right", seed: int = 123, same_ids: bool = False) -> dict:
    """A batch with row i holding lengths[i] real tokens, padded (id 0) on `side` to max(lengths).

    same_ids: every row's real tokens are the first lengths[i] of one sequence (rows then differ only by
    the adapters they run). Decoders also get position_ids counted over the real tokens (as generation
    does), so a left-padded row sees the same positions as the row alone.
    """
    seq = max(lengths)
    ids = make_ids(len(lengths), seq, seed)
    if same_ids:
        ids = ids[:1].expand(len(lengths), seq)
    out = torch.zeros(len(lengths), seq, dtype=torch.long)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        start = 0 if side == "right" else seq - n
        out[i, start:start + n] = ids[i, :n]
        mask[i, start:start + n] = 1
    inputs = {"input_ids": out, "attention_mask": mask}
    if arch in DECODERS:
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return inputs


def row_alone(inputs: dict, i: int) -> dict:
    """Row i of a padded batch as a batch of one, without its padding."""
    keep = inputs["attention_mask"][i].bool()
    out = {k: v[i:i + 1, keep] for k, v in inputs.items()}
    if "position_ids" in out:
        out["position_ids"] = torch.arange(int(keep.sum()))[None]
    return out


def hidden_states(out: object) -> torch.Tensor:
    """The backbone's last hidden state of a model output; outputs split per head (a BatchSplit or
    Parallel setup whose adapters have no head gives one backbone slice per child) are concatenated."""
    parts = getattr(out, "head_outputs", None)
    if parts is not None:
        return torch.cat([hidden_states(p) for p in parts])
    return out.last_hidden_state


def run(model: torch.nn.Module, inputs: dict, setup: object = None) -> torch.Tensor:
    """last_hidden_state under `setup` (None: the bare backbone)."""
    with torch.no_grad(), AdapterSetup(setup):
        return hidden_states(model(**inputs))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread (tiny models: many times faster on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
