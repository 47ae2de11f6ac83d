"""eject_prefix_tuning and merge_adapter / unmerge_adapter keep the function and restore the backbone.

Merge contract (what model.py implements, as AdapterHub does): merge_adapter folds the LoRA/IA3 update
into the base weights and the layer then skips that adapter's own computation, so
  merged weights + adapter active  == unmerged weights + adapter active   (no double counting), and
  merged weights + nothing active  == the same (the update is now part of the backbone);
running a *different* LoRA/IA3 on a merged layer is refused; unmerge restores every tensor bit-exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import add_noise, backbone_state, build, make_inputs, max_diff, run

EJECT_ARCHS = ("bert", "gpt2", "llama")  # llama: grouped-query (n_kv_heads * head_dim != hidden)
MERGE_ARCHS = ("bert", "gpt2", "llama")
MERGE_CONFIGS = {
    "lora": "lora",
    "lora_alpha16_all": "lora[r=4,alpha=16,attn_matrices=[q,k,v,o],intermediate_lora=True,output_lora=True]",
    "lora_v_only": "lora[attn_matrices=[v]]",  # GPT-2: only one third of the fused c_attn
    "ia3": "ia3",
    "ia3_all": "ia3[attn_matrices=[q,k,v,o],output_lora=True]",
}


def _n_params(model: torch.nn.Module, name: str) -> int:
    return sum(p.numel() for p in model.adapter_parameters(name))


@pytest.mark.parametrize("config", ["prefix_tuning", "prefix_tuning[prefix_length=4]|lora", "mam"])
@pytest.mark.parametrize("arch", EJECT_ARCHS)
def test_eject_prefix_keeps_output(arch: str, config: str, tmp_path: Path) -> None:
    model = build(arch)
    x = make_inputs(arch)
    model.add_adapter("p", config)
    add_noise(model, "p")
    want = run(model, x, "p")
    n_before = _n_params(model, "p")
    backbone = backbone_state(model, exclude="p")

    model.eject_prefix_tuning("p")
    assert max_diff(run(model, x, "p"), want) < 1e-5
    assert _n_params(model, "p") < n_before
    prefix_keys = [k for k in model.adapter_state_dict("p") if ".prefix_tunings." in k]
    assert prefix_keys == [f"{model.base_model_prefix}.prefix_tuning.prefix_tunings.p.self_prefix.control_trans"]
    # the recorded config now says flat, and every other member of a union is kept
    cfg = model.adapters_config["p"]
    members = cfg.methods()
    assert [m.flat for m in members if hasattr(m, "flat")] == [True]
    assert len(members) == (1 if config == "prefix_tuning" else 2)
    assert backbone_state(model, exclude="p").keys() == backbone.keys()

    # the ejected adapter saves and loads as a flat prefix
    model.save_adapter(tmp_path, "p")
    fresh = build(arch)
    fresh.load_adapter(tmp_path)
    assert max_diff(run(fresh, x, "p"), want) < 1e-5
    # ejecting an already flat prefix is a no-op
    model.eject_prefix_tuning("p")
    assert max_diff(run(model, x, "p"), want) < 1e-5


def test_eject_errors() -> None:
    model = build("bert")
    model.add_adapter("bn", "seq_bn")
    with pytest.raises(ValueError, match="no prefix tuning"):
        model.eject_prefix_tuning("bn")
    with pytest.raises(ValueError, match="no adapter named"):
        model.eject_prefix_tuning("missing")


@pytest.mark.parametrize("config", list(MERGE_CONFIGS))
@pytest.mark.parametrize("arch", MERGE_ARCHS)
def test_merge_keeps_output_and_unmerge_restores(arch: str, config: str) -> None:
    model = build(arch)
    x = make_inputs(arch)
    model.add_adapter("l", MERGE_CONFIGS[config])
    add_noise(model, "l", sigma=0.1)
    base = run(model, x)
    want = run(model, x, "l")
    assert max_diff(want, base) > 1e-3
    before = backbone_state(model, exclude="l")
    adapter_before = {k: v.clone() for k, v in model.adapter_state_dict("l").items()}

    model.merge_adapter("l")
    mid = backbone_state(model, exclude="l")
    assert any(not torch.equal(before[k], mid[k]) for k in before), "merging changed no base weight"
    assert max_diff(run(model, x, "l"), want) < 1e-5  # merged + active: not counted twice
    assert max_diff(run(model, x), want) < 1e-5  # merged + none active: baked into the backbone
    model.merge_adapter("l")  # merging twice is a no-op
    assert max_diff(run(model, x, "l"), want) < 1e-5
    assert all(torch.equal(v, model.adapter_state_dict("l")[k]) for k, v in adapter_before.items())

    model.unmerge_adapter("l")
    after = backbone_state(model, exclude="l")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"unmerge did not restore: {changed[:5]}"
    assert torch.equal(run(model, x), base)
    assert max_diff(run(model, x, "l"), want) < 1e-6


@pytest.mark.parametrize("arch", MERGE_ARCHS)
def test_merged_layer_refuses_another_lora(arch: str) -> None:
    model = build(arch)
    x = make_inputs(arch)
    model.add_adapter("l", "lora")
    model.add_adapter("m", "lora")
    add_noise(model, "l")
    add_noise(model, "m", seed=2)
    model.merge_adapter("l")
    with pytest.raises(ValueError, match="'l' is merged"):
        run(model, x, "m")
    with pytest.raises(ValueError, match="already merged"):
        model.merge_adapter("m")
    model.unmerge_adapter()
    model.merge_adapter("m")
    model.unmerge_adapter("m")


@pytest.mark.parametrize("arch", MERGE_ARCHS)
def test_delete_merged_adapter_restores_backbone(arch: str) -> None:
    model = build(arch)
    x = make_inputs(arch)
    base = run(model, x)
    before = backbone_state(model)
    model.add_adapter("l", "ia3")
    add_noise(model, "l", sigma=0.2)
    model.merge_adapter("l")
    model.delete_adapter("l")
    after = backbone_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(run(model, x), base)


def test_merge_union_keeps_the_prefix_part() -> None:
    """Merging a prefix|lora union folds only the LoRA part; with the adapter active the prefix still applies."""
    model = build("llama")
    x = make_inputs("llama")
    model.add_adapter("u", "prefix_tuning[prefix_length=4]|lora")
    add_noise(model, "u")
    want = run(model, x, "u")
    model.merge_adapter("u")
    assert max_diff(run(model, x, "u"), want) < 1e-5
    model.unmerge_adapter("u")
    assert max_diff(run(model, x, "u"), want) < 1e-6


def test_merge_rejects_non_lora() -> None:
    model = build("bert")
    model.add_adapter("bn", "seq_bn")
    with pytest.raises(ValueError, match="not a LoRA"):
        model.merge_adapter("bn")
    with pytest.raises(ValueError, match="not a LoRA"):
        model.merge_adapter("missing")
