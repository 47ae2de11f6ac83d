"""Shared helpers for the adapters_core model tests: tiny seeded backbones, inputs, noise, comparisons.

Every backbone here is tiny (hidden 32, 2 layers) and built from a fixed seed, so two calls with the same
arguments give bit-identical weights; dropout is switched off so training steps are deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    RobertaConfig,
)

from adapters_core import AdapterSetup, AutoAdapterModel, init

from .device_check import device_check

SHARED = Path(__file__).resolve().parents[2].parent / "shared"  # ../shared beside the checkout (also in CI)
REFERENCE = SHARED / "reference"
REFERENCE_DECODERS = SHARED / "reference_decoders"
REFERENCE_GENERATION = SHARED / "reference_generation"


def adapter_folder(case_dir: Path) -> Path:
    """A reference case's adapter_safetensors folder when present, else AdapterHub's .bin folder (`adapter/`)."""
    st = case_dir / "adapter_safetensors"
    return st if (st / "adapter.safetensors").is_file() else case_dir / "adapter"

VOCAB = 100
BATCH, SEQ = 3, 7


def _bert() -> PretrainedConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def _roberta() -> PretrainedConfig:
    # RoBERTa numbers positions from pad_token_id + 1, so it needs seq_len + 2 position embeddings and
    # input ids that avoid pad_token_id (1) at valid positions.
    return RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64 + 2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def _gpt2() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def _llama_like(cls: type[PretrainedConfig]) -> Callable[[], PretrainedConfig]:
    def make() -> PretrainedConfig:
        return cls(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, attention_dropout=0.0,
        )
    return make


CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "bert": _bert,
    "roberta": _roberta,
    "gpt2": _gpt2,
    "llama": _llama_like(LlamaConfig),
    "mistral": _llama_like(MistralConfig),
    "qwen2": _llama_like(Qwen2Config),
}
ARCHS = tuple(CONFIGS)
DECODERS = ("gpt2", "llama", "mistral", "qwen2")
# Half the architectures go through AutoAdapterModel.from_config, the other half through
# AutoModel.from_config + init(), so both entry points are exercised by every method test.
VIA_INIT = frozenset({"roberta", "mistral", "qwen2"})


def tiny_config(arch: str) -> PretrainedConfig:
    return CONFIGS[arch]()


def build(arch: str, seed: int = 0, attn: str = "eager", via_init: bool | None = None) -> torch.nn.Module:
    """A tiny random backbone with adapter support; same (arch, seed) -> bit-identical weights."""
    torch.manual_seed(seed)
    config = tiny_config(arch)
    if via_init is None:
        via_init = arch in VIA_INIT
    if via_init:
        model = init(AutoModel.from_config(config, attn_implementation=attn))
    else:
        model = AutoAdapterModel.from_config(config, attn_implementation=attn)
    return model.eval()


def make_inputs(arch: str, batch: int = BATCH, seq: int = SEQ, seed: int = 123, pad_last: int = 2) -> dict:
    """Random ids (avoiding special ids 0-2) with the last row right-padded by `pad_last` positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        mask[-1, seq - pad_last:] = 0
        ids[-1, seq - pad_last:] = 1 if arch == "roberta" else 0
    return {"input_ids": ids, "attention_mask": mask}


def valid(inputs: dict) -> torch.Tensor:
    return inputs["attention_mask"].bool()


def run(model: torch.nn.Module, inputs: dict, setup: object = None) -> torch.Tensor:
    """last_hidden_state under `setup` (None: no adapter active) without autograd."""
    with torch.no_grad(), AdapterSetup(setup):
        return model(**inputs).last_hidden_state


def add_noise(model: torch.nn.Module, name: str, sigma: float = 0.05, seed: int = 1) -> None:
    """Add N(0, sigma) to every parameter of adapter `name` (so zero-initialised parts contribute)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * sigma)


def backbone_state(model: torch.nn.Module, exclude: str | None = None) -> dict[str, torch.Tensor]:
    """Clones of every non-adapter parameter and buffer (adapter ones are recognised by identity)."""
    adapter_ids = set()
    if exclude is not None:
        adapter_ids = {id(p) for p in model.adapter_parameters(exclude)}
    out = {}
    for key, p in model.named_parameters():
        if id(p) not in adapter_ids:
            out[key] = p.detach().clone()
    for key, b in model.named_buffers():
        out[key] = b.detach().clone()
    return out


def assert_same_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"backbone tensors changed: {changed[:5]}"


def max_diff(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    d = (a - b).abs()
    if where is not None:
        d = d[where]
    return float(d.max())



@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core runner torch's spinning worker
    threads make them ~10x slower (measured: 20 training steps on 3 tiny models, 1.3 s vs 12 s). Restored
    after each module so nothing outside these tests is affected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: ADAPTERSERVE_DEVICE_CHECK=1 runs every test here under the device check, not only those marked
#: `device_check` (flex_attention tests aside: torch.compile refuses a dispatch mode).
DEVICE_CHECK_ALL = os.environ.get("ADAPTERSERVE_DEVICE_CHECK") == "1"


def _module_marked(module: object) -> bool:
    marks = getattr(module, "pytestmark", [])
    return any(m.name == "device_check" for m in (marks if isinstance(marks, list) else [marks]))


@pytest.fixture(autouse=True, scope="module")
def _device_check_module(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module marked `device_check` runs under it whole, its module-scoped models built inside it too."""
    if _module_marked(request.module):
        with device_check():
            yield
    else:
        yield


@pytest.fixture(autouse=True)
def _device_check_function(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test marked `device_check` (or every test, with ADAPTERSERVE_DEVICE_CHECK=1) in a module that is not."""
    wanted = request.node.get_closest_marker("device_check") is not None or (
        DEVICE_CHECK_ALL and "flex" not in request.node.nodeid)
    if wanted and not _module_marked(request.module):
        with device_check():
            yield
    else:
        yield
