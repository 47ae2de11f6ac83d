"""adapters_core generates what AdapterHub's models generate (../shared/reference_generation, DESIGN 3b).

Every case: teacher-forced `logits` < 1e-4 and the greedy continuation exactly `generated`, generated WITH
the KV cache (the references hold the true, uncached continuation: AdapterHub's own cached generation on
Llama is wrong), under the default attention and eager; `base_*` with the adapter loaded but none active.
Then all of an architecture's adapters at once: one padded BatchSplit batch generates, row by row, what
each adapter generates alone.

Per architecture folder (encoder-decoder families add theirs beside the decoder-only ones): LOADERS, how its
LM is loaded with adapter support; PADDING_SIDE, how its prompts are padded for generation; CASES, the cases
its README promises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from adapters_core import AdapterSetup, AutoAdapterModel, BatchSplit, init

from .conftest import REFERENCE_GENERATION, adapter_folder

TOL = 1e-4
NEW_TOKENS = 8
GENERATE: dict[str, Any] = {
    "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "num_beams": 1,
    "suppress_tokens": [0, 1, 2], "use_cache": True,
}
ATTN = (None, "eager")  # None: the model's default implementation (sdpa)
TEACHER_KEYS = ("input_ids", "attention_mask", "decoder_input_ids")


def causal_lm(backbone: Path, attn: str | None) -> nn.Module:
    kwargs = {} if attn is None else {"attn_implementation": attn}
    return init(AutoModelForCausalLM.from_pretrained(backbone, **kwargs).eval())


ALL_CASES = ("compacter_pp", "compacter_pp_layer_rules", "double_seq_bn", "ia3", "lora", "par_bn",
             "prefix_tuning", "prefix_tuning_mam", "seq_bn")
LOADERS: dict[str, Callable[[Path, str | None], nn.Module]] = {"gpt2_lm": causal_lm, "llama_lm": causal_lm}
PADDING_SIDE: dict[str, str] = {"gpt2_lm": "left", "llama_lm": "left"}
CASES: dict[str, tuple[str, ...]] = {"gpt2_lm": ALL_CASES, "llama_lm": ALL_CASES}


def cases(arch: str) -> tuple[str, ...]:
    folder = REFERENCE_GENERATION / arch
    return tuple(sorted(p.name for p in folder.iterdir() if (p / "outputs.safetensors").is_file()))


@pytest.fixture(scope="module")
def models() -> Iterator[Callable[[str, str | None], nn.Module]]:
    """(arch, attn) -> its LM with adapter support, each loaded once for the module."""
    loaded: dict[tuple[str, str | None], nn.Module] = {}

    def get(arch: str, attn: str | None) -> nn.Module:
        if (arch, attn) not in loaded:
            loaded[(arch, attn)] = LOADERS[arch](REFERENCE_GENERATION / arch / "backbone", attn)
        return loaded[(arch, attn)]

    yield get


def generate(model: nn.Module, inputs: dict[str, torch.Tensor], setup: object) -> torch.Tensor:
    """The greedy continuation (new tokens only), with the KV cache; checks the cache held every step."""
    with torch.no_grad(), AdapterSetup(setup):
        out = model.generate(**inputs, **GENERATE, return_dict_in_generate=True)
    # every token but the last went through the self-attention cache once, and nothing else (no prefix)
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1
    return out.sequences[:, -NEW_TOKENS:]


def teacher_forced(model: nn.Module, inputs: dict[str, torch.Tensor], setup: object) -> torch.Tensor:
    with torch.no_grad(), AdapterSetup(setup):
        return model(**inputs).logits


def row(out: dict[str, torch.Tensor], i: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: out[k][i:i + 1] for k in keys if k in out}


@pytest.mark.parametrize("arch", sorted(LOADERS))
def test_reference_folders_are_complete(arch: str) -> None:
    assert cases(arch) == CASES[arch]


@pytest.mark.parametrize("attn", ATTN, ids=lambda a: a or "default")
@pytest.mark.parametrize(("arch", "case"), [(a, c) for a in sorted(LOADERS) for c in CASES[a]])
def test_generation_reference(models: Callable, arch: str, case: str, attn: str | None) -> None:
    model = models(arch, attn)
    case_dir = REFERENCE_GENERATION / arch / case
    out = load_file(str(case_dir / "outputs.safetensors"))
    name = model.load_adapter(adapter_folder(case_dir), load_as=f"ref_{case}", with_head=False,
                              allow_pickle=True)  # trusted local files (AdapterHub's .bin where its save failed)
    try:
        for setup, logits, generated in ((name, "logits", "generated"), (None, "base_logits", "base_generated")):
            got = teacher_forced(model, {k: out[k] for k in TEACHER_KEYS if k in out}, setup)
            diff = (got - out[logits]).abs().max().item()
            assert diff < TOL, f"{arch}/{case} {logits} ({attn}): {diff:.2e}"
            for i in range(out["input_ids"].shape[0]):  # each prompt alone, as the references ran
                ids = generate(model, row(out, i, ("input_ids", "attention_mask")), setup)
                assert torch.equal(ids, out[generated][i:i + 1]), f"{arch}/{case} {generated} row {i} ({attn})"
        assert (out["logits"] - out["base_logits"]).abs().max() > 0.1
    finally:
        model.delete_adapter(name)


def padded_prompts(prompts: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    """The prompts (1-D id tensors) as one batch padded on `side` (pad id 0, masked out)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=prompts[0].dtype)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for j, prompt in enumerate(prompts):
        cols = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[j, cols] = prompt
        mask[j, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("attn", ATTN, ids=lambda a: a or "default")
@pytest.mark.parametrize("arch", sorted(LOADERS))
def test_batch_split_generates_what_each_adapter_generates_alone(models: Callable, arch: str,
                                                                  attn: str | None) -> None:
    """Row j: adapter j on its reference prompt j % 3, whole for even j (then also its `generated`), else cut
    by 1-3 tokens, so the batch holds prompts of 10, 9, 8 and 7 tokens."""
    model = models(arch, attn)
    dirs = [REFERENCE_GENERATION / arch / case for case in cases(arch)]
    outs = [load_file(str(d / "outputs.safetensors")) for d in dirs]
    names = [model.load_adapter(adapter_folder(d), load_as=f"all_{d.name}", with_head=False, allow_pickle=True)
             for d in dirs]
    try:
        full = outs[0]["input_ids"].shape[1]
        cuts = [0 if j % 2 == 0 else 1 + (j // 2) % 3 for j in range(len(outs))]
        prompts = [out["input_ids"][j % 3, :full - cut] for j, (out, cut) in enumerate(zip(outs, cuts, strict=True))]
        inputs = padded_prompts(prompts, PADDING_SIDE[arch])
        batch = generate(model, inputs, BatchSplit(*names, batch_sizes=[1] * len(names)))
        for j, (name, prompt, out) in enumerate(zip(names, prompts, outs, strict=True)):
            alone = generate(model, {"input_ids": prompt[None], "attention_mask": torch.ones_like(prompt)[None]}, name)
            assert torch.equal(batch[j:j + 1], alone), f"{arch} row {j} ({name}, {len(prompt)} tokens, {attn})"
            if len(prompt) == full:
                assert torch.equal(alone, out["generated"][j % 3:j % 3 + 1]), f"{arch} row {j} ({name})"
    finally:
        for name in names:
            model.delete_adapter(name)


def greedy_with_cache(model: nn.Module, ids: torch.Tensor, setup: object, head: str) -> torch.Tensor:
    """GENERATE's greedy continuation by hand, feeding back the KV cache (AdapterModel has no generate())."""
    past, new, step, mask = None, [], ids, torch.ones_like(ids)
    with torch.no_grad(), AdapterSetup(setup):
        for _ in range(NEW_TOKENS):
            out = model(input_ids=step, attention_mask=mask, cache=past, use_cache=True, head=head)
            logits = out.logits[:, -1].clone()
            logits[:, GENERATE["suppress_tokens"]] = float("-inf")
            step = logits.argmax(-1, keepdim=True)
            past, mask = out.past_key_values, torch.cat([mask, torch.ones_like(step)], dim=1)
            new.append(step)
    assert past.get_seq_length() == ids.shape[1] + NEW_TOKENS - 1
    return torch.cat(new, dim=1)


def test_adapter_model_causal_lm_head_generates_like_the_lm(models: Callable) -> None:
    """AutoAdapterModel + a tied causal_lm head (layers=1, no bias: GPT-2's own LM head) continues like the LM."""
    case_dir = REFERENCE_GENERATION / "gpt2_lm" / "prefix_tuning_mam"
    out = load_file(str(case_dir / "outputs.safetensors"))
    lm = models("gpt2_lm", None)
    model = AutoAdapterModel.from_pretrained(REFERENCE_GENERATION / "gpt2_lm" / "backbone").eval()
    model.add_causal_lm_head("lm", layers=1, activation_function=None, layer_norm=False, bias=False)
    names = [m.load_adapter(adapter_folder(case_dir), with_head=False, allow_pickle=True) for m in (model, lm)]
    try:
        inputs = {k: out[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad(), AdapterSetup(names[0]):
            logits = model(**inputs, head="lm").logits
        assert (logits - out["logits"]).abs().max() < TOL
        for i in range(out["input_ids"].shape[0]):
            ids = greedy_with_cache(model, out["input_ids"][i:i + 1], names[0], "lm")
            assert torch.equal(ids, generate(lm, row(out, i, ("input_ids", "attention_mask")), names[1]))
            assert torch.equal(ids, out["generated"][i:i + 1])
    finally:
        lm.delete_adapter(names[1])
