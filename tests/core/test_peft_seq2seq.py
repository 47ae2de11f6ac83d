"""PEFT LoRA folders for T5 and BART: decoder module paths (numbered from 0 in PEFT) map onto AdapterHub's
continued layer numbering, and the loaded adapter computes W + (alpha / r) B A."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .tiny_seq2seq import build_seq2seq, logits, seq2seq_inputs

MODULES = {  # PEFT module paths under base_model.model. (T5: q/v of all three attentions; BART the same)
    "t5": ("encoder.block.{i}.layer.0.SelfAttention.{m}", "decoder.block.{i}.layer.0.SelfAttention.{m}",
           "decoder.block.{i}.layer.1.EncDecAttention.{m}"),
    "bart": ("model.encoder.layers.{i}.self_attn.{m}_proj", "model.decoder.layers.{i}.self_attn.{m}_proj",
             "model.decoder.layers.{i}.encoder_attn.{m}_proj"),
}


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_peft_lora_on_encoder_decoders(arch: str, tmp_path: Path) -> None:
    r, alpha = 4, 8.0
    g = torch.Generator().manual_seed(3)
    state = {}
    for template in MODULES[arch]:
        for i in range(2):
            for m in ("q", "v"):
                path = template.format(i=i, m=m)
                state[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r, 32, generator=g) * 0.3
                state[f"base_model.model.{path}.lora_B.weight"] = torch.randn(32, r, generator=g) * 0.3
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q", "v"], "lora_dropout": 0.0}))
    model = build_seq2seq(arch)
    name = model.load_adapter(tmp_path)
    assert model.adapters_config[name].leave_out == ()
    merged = build_seq2seq(arch)
    with torch.no_grad():
        for key, a in state.items():
            if key.endswith("lora_A.weight"):
                path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = state[key.replace("lora_A", "lora_B")]
                merged.get_submodule(path).weight.add_(b @ a * (alpha / r))
    x = seq2seq_inputs()
    # float32: W x + s B (A x) and (W + s B A) x round differently; with these large deltas (0.3-scale A and B)
    # through four layers that reached 6.8e-5 on BART with transformers 5.24 (logits up to ~3)
    got, want = logits(model, x, name), logits(merged, x)
    assert float((got - want).abs().max()) < 2e-4 and float((got - want).abs().mean()) < 1e-5
