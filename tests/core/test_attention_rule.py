"""No attention implementation drops a prefix: sdpa, eager and flex_attention carry it, every other one refuses.

flex_attention runs compiled on CPU; torch 2.13's CPU codegen fails once dynamo recompiles it with dynamic
shapes, so the flex test keeps shapes static and runs one forward shape per architecture.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from adapters_core import AdapterSetup, BatchSplit, init
from adapters_core.methods.prefix_tuning.attention import make_flex_prefix_attention, make_prefix_attention
from adapters_core.methods.prefix_tuning.rule import CARRIED

from .tiny_models import ARCHS, add_adapter, build, hidden_states, max_abs, padded_inputs, tiny_config

PREFIX = "prefix_tuning[prefix_length=3,bottleneck_size=16]"
LONGER = "prefix_tuning[prefix_length=5,bottleneck_size=16]"
# What transformers 5.24 registers (besides "eager", the models' own default that the prefix room registers).
SETUP = BatchSplit("p", "q", batch_sizes=[2, 1])  # rows of different prefix lengths, padded rows
REGISTERED = {"sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4", "paged|eager"}


def with_prefixes(arch: str, attn: str, lm: bool = False) -> nn.Module:
    """Adapters p (3 prefix positions) and q (5) on a tiny model (lm: Llama with its LM head, for generate)."""
    if lm:
        torch.manual_seed(0)
        model = init(LlamaForCausalLM._from_config(tiny_config(arch), attn_implementation=attn).eval())
    else:
        model = build(arch, attn)
    add_adapter(model, "p", PREFIX, seed=1)
    add_adapter(model, "q", LONGER, seed=2)
    return model


def forward(model: nn.Module, inputs: dict, setup: object) -> torch.Tensor:
    with torch.no_grad(), AdapterSetup(setup):
        return hidden_states(model(**inputs))


@pytest.mark.parametrize("arch", ARCHS)
def test_flex_attention_carries_the_prefix(arch: str) -> None:
    if arch == "gpt2":  # transformers itself refuses flex_attention on GPT-2: no model, no dropped prefix
        with pytest.raises(ValueError, match="flex_attention"):
            build(arch, "flex_attention")
        return
    inputs = padded_inputs(arch, [7, 4, 6], side="left" if arch == "llama" else "right")
    eager = with_prefixes(arch, "eager")
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        flex = forward(with_prefixes(arch, "flex_attention"), inputs, SETUP)
    valid = inputs["attention_mask"].bool()
    assert max_abs(flex[valid], forward(eager, inputs, SETUP)[valid]) < 1e-5
    assert max_abs(flex[valid], forward(with_prefixes(arch, "sdpa"), inputs, SETUP)[valid]) < 1e-5
    assert max_abs(flex[valid], forward(eager, inputs, None)[valid]) > 1e-3


def test_flex_attention_carries_the_prefix_at_decode_steps() -> None:
    """Llama generates under flex_attention with the KV cache what it generates under eager, prefixes and all."""
    inputs = padded_inputs("llama", [7, 4, 6], side="left")
    del inputs["position_ids"]
    kwargs = {"max_new_tokens": 2, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    runs = {}
    for attn in ("eager", "flex_attention"):
        model = with_prefixes("llama", attn, lm=True)
        with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False), AdapterSetup(SETUP):
            runs[attn] = model.generate(**inputs, **kwargs)
    assert torch.equal(runs["eager"].sequences, runs["flex_attention"].sequences)
    for eager, flex in zip(runs["eager"].logits, runs["flex_attention"].logits, strict=True):
        assert max_abs(eager, flex) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_flex_wrapper_without_a_block_mask(causal: bool) -> None:
    """The path the models here do not take: no mask at all (bidirectional or causal).

    An additive score mask (flex's other input) is extended like eager's but left untested: on CPU, torch
    2.13's compiled flex_attention with a score-mask tensor corrupts the heap even without a prefix.
    """
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    keep = torch.tensor([[True, True, True], [False, True, True]])  # row 1: a shorter prefix
    found = (torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 4, 3, 8, generator=g), keep)
    module = nn.Module()
    module.is_causal = causal
    sdpa = make_prefix_attention(sdpa_attention_forward, lambda m, n: found, as_bool=True)
    flex = make_flex_prefix_attention(flex_attention_forward, lambda m, n: found)
    want = sdpa(module, query, key, value, None, scaling=0.3)[0]
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        got = flex(module, query, key, value, None, scaling=0.3)[0]
    assert max_abs(got, want) < 1e-5


def test_every_registered_implementation_carries_or_refuses() -> None:
    build("gpt2")  # wiring installs the wrappers
    assert REGISTERED - {"sdpa", "flex_attention"} <= set(ALL_ATTENTION_FUNCTIONS) - set(CARRIED)
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    found = (torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8), torch.ones(2, 3, dtype=torch.bool))
    prefixed = nn.Module()
    prefixed._adapterserve_layer = 0
    prefixed._adapterserve_location = "self"
    prefixed._adapterserve_prefix = types.SimpleNamespace(prefix_for=lambda location, layer, batch: found)
    for name in set(ALL_ATTENTION_FUNCTIONS) - set(CARRIED):
        with pytest.raises(ValueError, match=f"'{name}'"):
            ALL_ATTENTION_FUNCTIONS[name](prefixed, query, key, value, None, scaling=0.3)
    out, _ = ALL_ATTENTION_FUNCTIONS["paged|eager"](nn.Module(), query, key, value, None, scaling=0.3)
    assert out.shape == (2, 5, 4, 8)


@pytest.mark.parametrize("arch", ARCHS)
def test_flash_attention_2_by_name_is_refused(arch: str) -> None:
    model = build(arch)
    add_adapter(model, "p", PREFIX, seed=1)
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="'flash_attention_2'"):
        model.add_adapter("p2", PREFIX)
    with pytest.raises(ValueError, match="'flash_attention_2'"):
        model.add_adapter("mam", f"{PREFIX}|par_bn")
    assert not model.has_adapter("p2") and not model.has_adapter("mam")
    with pytest.raises(ValueError, match="'flash_attention_2'"):
        model.set_active_adapters("p")
    with pytest.raises(ValueError, match="'flash_attention_2'"):
        forward(model, padded_inputs(arch, [5, 5]), "p")  # refused before any attention call
    model.add_adapter("bn", "seq_bn", set_active=True)  # methods without a prefix are unaffected


@pytest.mark.parametrize("arch", ARCHS)
def test_implementation_changed_after_activation_refuses_at_forward(arch: str) -> None:
    model = build(arch)
    add_adapter(model, "p", PREFIX, seed=1)
    model.set_active_adapters("p")
    inputs = padded_inputs(arch, [5, 5])
    model.base_model.set_attn_implementation("paged|eager")
    assert model.config._attn_implementation == "paged|eager"
    with pytest.raises(ValueError, match="'paged\\|eager'"), torch.no_grad():
        model(**inputs)
    with pytest.raises(ValueError, match="'paged\\|eager'"):
        forward(model, inputs, "p")
    model.base_model.set_attn_implementation("sdpa")
    assert max_abs(forward(model, inputs, None), forward(model, inputs, "p")) > 1e-3


def test_packed_sequences_are_refused() -> None:
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 4, 6, 8, generator=g) for _ in range(3))
    found = (torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8), torch.ones(1, 3, dtype=torch.bool))
    attention = make_prefix_attention(sdpa_attention_forward, lambda m, n: found, as_bool=True)
    module = nn.Module()
    module.is_causal = True
    with pytest.raises(ValueError, match="packed"):
        attention(module, query, key, value, None, cu_seq_lens_q=torch.tensor([0, 2, 6]), scaling=0.3)



def test_flex_attention_carries_bart_prefixes() -> None:
    """BART's encoder, decoder-self and cross prefixes under flex_attention equal eager's."""
    from .tiny_seq2seq import build_seq2seq, logits, seq2seq_inputs

    inputs = seq2seq_inputs(pad_last=0)
    runs = {}
    for attn in ("eager", "flex_attention"):
        model = build_seq2seq("bart", attn=attn)
        add_adapter(model, "p", PREFIX, seed=1)
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            runs[attn] = logits(model, inputs, "p")
        bare = logits(model, inputs)
    assert max_abs(runs["flex_attention"], runs["eager"]) < 1e-5
    assert max_abs(runs["flex_attention"], bare) > 1e-3


def test_flex_attention_with_t5_relative_bias_refuses_a_prefix() -> None:
    """T5 passes a relative position bias that flex would index over keys only: refused, never misapplied."""
    from .tiny_seq2seq import build_seq2seq, logits, seq2seq_inputs

    model = build_seq2seq("t5", attn="flex_attention")
    add_adapter(model, "p", PREFIX, seed=1)
    with pytest.raises(ValueError, match="flex_attention' with a relative position bias"):
        logits(model, seq2seq_inputs(pad_last=0), "p")
