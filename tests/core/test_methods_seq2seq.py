"""Every adapter method on the encoder-decoder families (T5, Flan-T5, BART, mBART; MT5 smoke-tested).

Tiny random *ForConditionalGeneration models (tiny_seq2seq.py) made adapter-capable with init(): the
adapter changes the logits, cached generation equals uncached, save -> load is identical (Compacter++'s
shared PHM rule included), delete leaves nothing, train_adapter trains only the adapter, eject keeps the
output; AdapterHub's layer numbering (decoder layers continue after the encoder's) and key names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapters_core import BnConfig, LoRAConfig, PrefixTuningConfig

from .conftest import add_noise, backbone_state
from .tiny_seq2seq import build_seq2seq, copy_task, generate, logits, seq2seq_inputs

ARCHS = ("t5", "flan_t5", "bart", "mbart")
METHODS: dict[str, object] = {
    "seq_bn": "seq_bn",
    "seq_bn_cross": BnConfig(mh_adapter=False, output_adapter=True, cross_adapter=True, reduction_factor=8,
                             non_linearity="relu", original_ln_before=True),
    "double_seq_bn": "double_seq_bn",
    "par_bn": "par_bn",
    "compacter": "compacter[reduction_factor=8]",
    "compacter++": "compacter++[reduction_factor=8]",
    "prefix_tuning": "prefix_tuning[prefix_length=3,bottleneck_size=16]",
    "prefix_tuning_flat": "prefix_tuning_flat[prefix_length=2]",
    "lora": "lora",
    "lora_all": LoRAConfig(attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True),
    "ia3": "ia3",
    "mam": "prefix_tuning[prefix_length=3,bottleneck_size=16]|par_bn",
}
PREFIX = ("prefix_tuning", "prefix_tuning_flat", "mam")

method_param = pytest.mark.parametrize("method", list(METHODS))
arch_param = pytest.mark.parametrize("arch", ARCHS)


def _with_adapter(arch: str, method: str, seed: int = 0) -> torch.nn.Module:
    model = build_seq2seq(arch, seed=seed)
    model.add_adapter("a", METHODS[method])
    add_noise(model, "a", sigma=0.3)
    return model


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@method_param
@arch_param
def test_adapter_changes_logits_and_cached_generation_is_exact(arch: str, method: str) -> None:
    model = _with_adapter(arch, method)
    x = seq2seq_inputs()
    base = logits(model, x)
    out = logits(model, x, "a")
    assert _diff(out, base) > 1e-3
    assert torch.equal(logits(model, x), base), "an inactive adapter changes nothing"
    model.set_active_adapters("a")
    with torch.no_grad():
        assert torch.equal(model(**x).logits, out), "static activation equals the context"
    model.set_active_adapters(None)
    cached = generate(model, x, "a", use_cache=True)
    assert torch.equal(cached, generate(model, x, "a", use_cache=False))


@method_param
@arch_param
def test_save_load_roundtrip(arch: str, method: str, tmp_path: Path) -> None:
    model = _with_adapter(arch, method)
    x = seq2seq_inputs()
    want = logits(model, x, "a")
    model.save_adapter(tmp_path, "a")
    with safe_open(tmp_path / "adapter.safetensors", "pt") as f:
        written = set(f.keys())
    saved = model.adapter_state_dict("a")
    assert written == set(saved)
    if method == "compacter++":
        assert any(k.endswith("shared_parameters.a.phm_rule") for k in written), "the shared PHM rule is saved"
    fresh = build_seq2seq(arch)
    assert fresh.load_adapter(tmp_path) == "a"
    loaded = fresh.adapter_state_dict("a")
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(logits(fresh, x, "a"), want)


@method_param
@arch_param
def test_delete_leaves_nothing(arch: str, method: str) -> None:
    never = build_seq2seq(arch)
    model = _with_adapter(arch, method)
    x = seq2seq_inputs()
    model.delete_adapter("a")
    assert sorted(model.state_dict()) == sorted(never.state_dict())
    assert sorted(k for k, _ in model.named_parameters()) == sorted(k for k, _ in never.named_parameters())
    assert torch.equal(logits(model, x), logits(never, x))


@method_param
@arch_param
def test_train_adapter_trains_only_the_adapter(arch: str, method: str) -> None:
    model = _with_adapter(arch, method)
    batch = copy_task()
    frozen = backbone_state(model, exclude="a")
    named = dict(model.adapter_named_parameters("a"))
    model.train_adapter("a")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in named.values()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.98 * losses[0], f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"
    after = backbone_state(model, exclude="a")
    assert [k for k in frozen if not torch.equal(frozen[k], after[k])] == []


@pytest.mark.parametrize("method", PREFIX)
@arch_param
def test_eject_prefix_tuning_keeps_the_output(arch: str, method: str, tmp_path: Path) -> None:
    model = _with_adapter(arch, method)
    x = seq2seq_inputs()
    want = logits(model, x, "a")
    model.eject_prefix_tuning("a")
    keys = [k for k in model.adapter_state_dict("a") if ".prefix_tunings." in k]
    assert keys and all(k.endswith("control_trans") for k in keys)
    assert {k.split(".")[-2] for k in keys} == {"encoder_prefix", "self_prefix", "cross_prefix"}
    ejected = logits(model, x, "a")
    assert _diff(ejected, want) < 1e-5
    assert torch.equal(generate(model, x, "a"), generate(model, x, "a", use_cache=False))
    model.save_adapter(tmp_path, "a")
    fresh = build_seq2seq(arch)
    fresh.load_adapter(tmp_path)
    assert torch.equal(logits(fresh, x, "a"), ejected)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_layer_indices_continue_into_the_decoder(arch: str) -> None:
    """leave_out and per-layer reduction factors count the decoder's layers after the encoder's (0-1, 2-3)."""
    model = build_seq2seq(arch)
    model.add_adapter("a", BnConfig(mh_adapter=False, output_adapter=True, non_linearity="relu",
                                    reduction_factor={"2": 4, "default": 16}, leave_out=[1, 3]))
    keys = model.adapter_state_dict("a")
    down = {k: v.shape[0] for k, v in keys.items() if k.endswith("adapter_down.0.weight")}
    enc, dec = ("encoder.block", "decoder.block") if arch == "t5" else ("model.encoder.layers", "model.decoder.layers")
    assert sorted(k.split(".adapters.")[0].removeprefix("model.").split(".")[2] for k in down) == ["0", "0"]
    assert {k.split(".")[0 if arch == "t5" else 1]: n for k, n in down.items()} == {"encoder": 2, "decoder": 8}
    assert all(k.startswith((enc, dec)) for k in keys)
    model.add_adapter("p", PrefixTuningConfig(prefix_length=3, bottleneck_size=16, leave_out=[0, 3]))
    shapes = {k.split(".")[-4]: v.shape for k, v in model.adapter_state_dict("p").items() if k.endswith("2.weight")}
    per_layer = 2 * 4 * 8
    assert shapes == {"encoder_prefix": (per_layer, 16), "self_prefix": (per_layer, 16), "cross_prefix": (per_layer, 16)}


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_prefix_switches_and_locations(arch: str) -> None:
    model = build_seq2seq(arch)
    model.add_adapter("p", PrefixTuningConfig(prefix_length=3, bottleneck_size=16, encoder_prefix=False,
                                              cross_prefix=False))
    assert {k.split(".prefix_tunings.p.")[1].split(".")[0] for k in model.adapter_state_dict("p")} == {"self_prefix"}
    model.add_adapter("x", BnConfig(mh_adapter=False, output_adapter=False, cross_adapter=True, reduction_factor=8,
                                    non_linearity="relu"))
    keys = list(model.adapter_state_dict("x"))
    want = "decoder.block.{}.layer.1.adapters.x." if arch == "t5" else "model.decoder.layers.{}.cross_attention_adapters.adapters.x."
    assert {k.split("adapter_")[0] for k in keys} == {want.format(0), want.format(1)}


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_bare_model_keys_and_files_from_the_lm_model(arch: str, tmp_path: Path) -> None:
    """init() on the bare T5Model/BartModel; files written by the LM model load there and back."""
    lm = build_seq2seq(arch)
    lm.add_adapter("a", "seq_bn|lora|prefix_tuning[prefix_length=3,bottleneck_size=16]")
    add_noise(lm, "a", sigma=0.3)
    lm.save_adapter(tmp_path / "lm", "a")
    bare = build_seq2seq(arch, bare=True)
    assert bare.load_adapter(tmp_path / "lm") == "a"
    state = bare.adapter_state_dict("a")
    assert not any(k.startswith(("model.", "transformer.")) for k in state)
    lm_state = lm.adapter_state_dict("a")
    prefix = "model." if arch == "bart" else ""
    assert {prefix + k for k in state} == set(lm_state)
    assert all(torch.equal(state[k], lm_state[prefix + k]) for k in state)
    bare.save_adapter(tmp_path / "bare", "a")
    again = build_seq2seq(arch)
    again.load_adapter(tmp_path / "bare", load_as="b")
    x = seq2seq_inputs()
    assert torch.equal(logits(again, x, "b"), logits(lm, x, "a"))


def test_mt5_smoke() -> None:
    model = _with_adapter("mt5", "compacter++")
    model.add_adapter("p", "prefix_tuning[prefix_length=3,bottleneck_size=16]|lora")
    add_noise(model, "p", sigma=0.3)
    x = seq2seq_inputs()
    for name in ("a", "p"):
        assert _diff(logits(model, x, name), logits(model, x)) > 1e-3
        assert torch.equal(generate(model, x, name), generate(model, x, name, use_cache=False))
