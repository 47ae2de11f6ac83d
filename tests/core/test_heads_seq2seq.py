"""AutoAdapterModel on T5 and BART with a seq2seq_lm head: the pretrained LM head, labels, AdapterHub files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM

from adapters_core import AdapterSetup, AutoAdapterModel, BartAdapterModel, T5AdapterModel, init

from .conftest import SHARED, add_noise
from .tiny_seq2seq import copy_task, seq2seq_inputs, tiny_seq2seq_config

REFERENCE = SHARED / "reference_generation"
CLASSES = {"t5": T5AdapterModel, "bart": BartAdapterModel}


def _pair(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """An AdapterModel with a seq2seq_lm head and the HF LM model with the same weights."""
    config = tiny_seq2seq_config(arch)
    torch.manual_seed(0)
    lm = AutoModelForSeq2SeqLM.from_config(config).eval()
    model = AutoAdapterModel.from_config(config).eval()
    missing, _ = model.base_model.load_state_dict(lm.base_model.state_dict(), strict=False)
    assert not [k for k in missing if "adapter" not in k and "prefix_tuning" not in k]
    model.add_seq2seq_lm_head("lm")
    return model, lm


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_tied_seq2seq_lm_head_is_the_pretrained_lm_head(arch: str) -> None:
    model, lm = _pair(arch)
    assert isinstance(model, CLASSES[arch])
    assert model.heads["lm"].output_embeddings.weight is model.base_model.get_input_embeddings().weight
    x = seq2seq_inputs()
    with torch.no_grad():
        assert float((model(**x).logits - lm(**x).logits).abs().max()) < 1e-5
    batch = copy_task()
    with torch.no_grad():
        ours, theirs = model(**batch).loss, lm(**batch).loss
    assert abs(float(ours) - float(theirs)) < 1e-5, "labels are shifted right into decoder inputs as HF does"


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_adapter_with_head_roundtrip(arch: str, tmp_path: Path) -> None:
    model, _ = _pair(arch)
    model.add_adapter("a", "prefix_tuning[prefix_length=3,bottleneck_size=16]|lora")
    add_noise(model, "a", sigma=0.3)
    model.add_seq2seq_lm_head("a")
    x = seq2seq_inputs()
    with torch.no_grad(), AdapterSetup("a"):
        want = model(**x).logits
    model.save_adapter(tmp_path, "a")
    fresh, _ = _pair(arch)
    assert fresh.load_adapter(tmp_path) == "a"
    with torch.no_grad(), AdapterSetup("a"):
        assert torch.equal(fresh(**x).logits, want)


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference_generation is not present")
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_reference_adapters_through_auto_adapter_model(arch: str) -> None:
    """AdapterHub's files (saved from *ForConditionalGeneration, no `transformer.`/`model.` prefix on T5) load
    into the AdapterModel, whose tied head then gives AdapterHub's logits."""
    model = AutoAdapterModel.from_pretrained(REFERENCE / arch / "backbone").eval()
    model.add_seq2seq_lm_head("lm")
    for case in ("lora", "prefix_tuning"):
        ref = load_file(str(REFERENCE / arch / case / "outputs.safetensors"))
        folder = REFERENCE / arch / case / "adapter_safetensors"
        name = model.load_adapter(folder if folder.is_dir() else folder.parent / "adapter", allow_pickle=True,
                                  with_head=False)
        inputs = {k: ref[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
        with torch.no_grad(), AdapterSetup(name, head_setup="lm"):
            got = model(**inputs).logits
        assert float((got - ref["logits"]).abs().max()) < 1e-4


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_adapter_model_files_load_into_the_lm_model(arch: str, tmp_path: Path) -> None:
    """Keys written by the AdapterModel carry `transformer.` (T5) / `model.` (BART); init()'s
    T5ForConditionalGeneration has none and BartForConditionalGeneration has `model.`: both read them."""
    model, lm = _pair(arch)
    model.add_adapter("a", "seq_bn|lora|prefix_tuning[prefix_length=3,bottleneck_size=16]")
    add_noise(model, "a", sigma=0.3)
    model.save_adapter(tmp_path, "a", with_head=False)
    init(lm)
    assert lm.load_adapter(tmp_path) == "a"
    prefix = {"t5": "transformer.", "bart": ""}[arch]
    assert set(model.adapter_state_dict("a")) == {prefix + k for k in lm.adapter_state_dict("a")}
    x = seq2seq_inputs()
    with torch.no_grad(), AdapterSetup("a", head_setup="lm"):
        want = model(**x).logits
    with torch.no_grad(), AdapterSetup("a"):
        assert float((lm(**x).logits - want).abs().max()) < 1e-5
