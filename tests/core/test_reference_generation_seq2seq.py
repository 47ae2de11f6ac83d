"""T5 and BART: adapters_core reproduces AdapterHub's teacher-forced logits and greedy generations.

../shared/reference_generation/{t5,bart}: adapters saved by AdapterHub `adapters` 1.3.0 on tiny
T5ForConditionalGeneration / BartForConditionalGeneration backbones (README there). We load each with
our reader, check the teacher-forced logits (< 1e-4) and the greedy continuation (exactly equal) WITH the
KV cache (self- and cross-attention caches), under eager and sdpa, with and without the adapter active.
Measured: T5 <= 1.4e-5 (LoRA), the rest <= 2.6e-6; BART <= 3.6e-7.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM

from adapters_core import AdapterSetup, BatchSplit, init

from .conftest import SHARED

REFERENCE = SHARED / "reference_generation"
TOL = 1e-4
ARCHS = ("t5", "bart")
ATTN = ("eager", "sdpa")
CASES = {
    "t5": ("compacter_pp_layer_rules", "double_seq_bn", "ia3", "lora", "par_bn", "prefix_tuning",
           "prefix_tuning_mam", "seq_bn"),
    "bart": ("compacter_pp", "compacter_pp_layer_rules", "double_seq_bn", "ia3", "lora", "par_bn", "prefix_tuning",
             "prefix_tuning_mam", "seq_bn"),
}
GENERATE = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "num_beams": 1, "suppress_tokens": [0, 1, 2]}

pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference_generation is not present")


def _folder(arch: str, case: str) -> Path:
    case_dir = REFERENCE / arch / case
    safetensors = case_dir / "adapter_safetensors"
    return safetensors if safetensors.is_dir() else case_dir / "adapter"


@functools.cache
def _outputs(arch: str, case: str) -> dict[str, torch.Tensor]:
    return load_file(str(REFERENCE / arch / case / "outputs.safetensors"))


@functools.cache
def _model(arch: str, attn: str) -> torch.nn.Module:
    """The backbone with every reference adapter of `arch` loaded (named like its case); never mutated."""
    model = init(AutoModelForSeq2SeqLM.from_pretrained(REFERENCE / arch / "backbone", attn_implementation=attn))
    assert model.config._attn_implementation == attn
    for case in CASES[arch]:
        with pytest.warns(UserWarning, match="no prediction heads"):
            assert model.load_adapter(_folder(arch, case), allow_pickle=True) == case
    return model.eval()


def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, setup: object) -> torch.Tensor:
    with torch.no_grad(), AdapterSetup(setup):
        out = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **GENERATE)
    return out[:, -GENERATE["max_new_tokens"]:]


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch,case", [(a, c) for a in ARCHS for c in CASES[a]])
def test_logits_and_generation(arch: str, case: str, attn: str) -> None:
    model, ref = _model(arch, attn), _outputs(arch, case)
    inputs = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"],
              "decoder_input_ids": ref["decoder_input_ids"]}
    for setup, logits, generated in ((case, "logits", "generated"), (None, "base_logits", "base_generated")):
        with torch.no_grad(), AdapterSetup(setup):
            got = model(**inputs).logits
        diff = float((got - ref[logits]).abs().max())
        assert diff < TOL, f"{arch}/{case} {logits} ({attn}): max abs diff {diff:.2e}"
        ids = _generate(model, ref["input_ids"], ref["attention_mask"], setup)
        assert torch.equal(ids, ref[generated]), f"{arch}/{case} {generated} ({attn}): {ids.tolist()}"


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_split_generates_each_row_as_alone(arch: str, attn: str) -> None:
    """All reference adapters at once, one row each with its own prompt length, in one padded batch."""
    model = _model(arch, attn)
    cases = CASES[arch]
    ids = torch.cat([_outputs(arch, c)["input_ids"][i % 3:i % 3 + 1] for i, c in enumerate(cases)])
    lengths = [10 - i % 5 for i in range(len(cases))]
    pad = model.config.pad_token_id
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    batch = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    got = _generate(model, batch, mask, BatchSplit(*cases, batch_sizes=[1] * len(cases)))
    for i, case in enumerate(cases):
        n = lengths[i]
        alone = _generate(model, ids[i:i + 1, :n], mask[i:i + 1, :n], case)
        assert torch.equal(got[i:i + 1], alone), f"{arch}: row {i} ({case}) generates differently in the batch"
