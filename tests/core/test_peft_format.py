"""PEFT adapter folders load as the equivalent AdapterHub-layout adapter.

The PEFT folders are written by hand in a tmp dir from seeded tensors, with PEFT's file and key names
(checked against huggingface/peft src/peft/utils/save_and_load.py, get_peft_model_state_dict): the
adapter name is removed from the keys, so a LoRA module's weights are
`base_model.model.<module path>.lora_A.weight` (r x in) and `...lora_B.weight` (out x r), scaling
lora_alpha / r; an (IA)^3 vector is a ParameterDict entry, saved as `base_model.model.<path>.ia3_l`,
shaped (out, 1) for output scaling and (1, in) for feed-forward (input) scaling. <module path> is the
path inside the model PEFT wrapped: `encoder.layer.0...` for a BertModel, `bert.encoder.layer.0...` for a
BertFor* model; `layers.0...` for a LlamaModel, `model.layers.0...` for LlamaForCausalLM.
The same tensors are then written as an AdapterHub-layout LoRA / IA3 folder and both must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters_core import IA3Config, LoRAConfig

from .conftest import build, make_inputs, max_diff, run

N_LAYERS = 2
HIDDEN = 32
KV_OUT = 16  # tiny Llama: 2 key/value heads x head_dim 8

# arch -> (PEFT target module names, module path of layer i's target, AdapterHub attn key, out features)
LORA_TARGETS = {
    "bert": {"query": ("encoder.layer.{i}.attention.self.query", HIDDEN),
             "value": ("encoder.layer.{i}.attention.self.value", HIDDEN)},
    "llama": {"q_proj": ("layers.{i}.self_attn.q_proj", HIDDEN),
              "v_proj": ("layers.{i}.self_attn.v_proj", KV_OUT)},
}
WRAPPER_PREFIX = {"bert": "bert.", "llama": "model."}  # the task model's base_model_prefix


def _seeded(shape: tuple[int, ...], seed: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _lora_tensors(arch: str, r: int) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, target) -> (A [r, in], B [out, r]) from fixed seeds."""
    out = {}
    for i in range(N_LAYERS):
        for j, (target, (_, n_out)) in enumerate(LORA_TARGETS[arch].items()):
            seed = 100 * i + 10 * j
            out[(i, target)] = (_seeded((r, HIDDEN), seed), _seeded((n_out, r), seed + 1))
    return out


def _write_peft_lora(folder: Path, arch: str, tensors: dict, r: int, alpha: float, wrapped: bool,
                     peft_type: str = "LORA", **extra: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": peft_type, "task_type": None, "r": r, "lora_alpha": alpha,
        "target_modules": list(LORA_TARGETS[arch]), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "base_model_name_or_path": f"tiny-random-{arch}", "inference_mode": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }
    config.update(extra)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model." + (WRAPPER_PREFIX[arch] if wrapped else "")
    state = {}
    for (i, target), (a, b) in tensors.items():
        path = LORA_TARGETS[arch][target][0].format(i=i)
        state[f"{prefix}{path}.lora_A.weight"] = a.contiguous()
        state[f"{prefix}{path}.lora_B.weight"] = b.contiguous()
    save_file(state, str(folder / "adapter_model.safetensors"))
    return folder


def _write_adapterhub(folder: Path, model: torch.nn.Module, name: str, config: object,
                      state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"config": config.to_dict(), "hidden_size": HIDDEN, "model_type": model.config.model_type,
            "model_name": "tiny", "model_class": "", "name": name, "version": "test"}
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    save_file(state, str(folder / "adapter.safetensors"))
    return folder


def _adapterhub_lora(folder: Path, model: torch.nn.Module, arch: str, tensors: dict, r: int, alpha: float) -> Path:
    root = model.base_model_prefix
    state = {}
    for (i, target), (a, b) in tensors.items():
        path = LORA_TARGETS[arch][target][0].format(i=i)
        state[f"{root}.{path}.loras.hub.lora_A"] = a
        state[f"{root}.{path}.loras.hub.lora_B"] = b
    return _write_adapterhub(folder, model, "hub", LoRAConfig(r=r, alpha=alpha), state)


@pytest.mark.parametrize("wrapped", [False, True], ids=["base-model", "task-model"])
@pytest.mark.parametrize(("r", "alpha"), [(4, 8), (8, 8)])
@pytest.mark.parametrize("arch", list(LORA_TARGETS))
def test_peft_lora_equals_adapterhub_lora(arch: str, r: int, alpha: int, wrapped: bool, tmp_path: Path) -> None:
    model = build(arch)
    x = make_inputs(arch)
    tensors = _lora_tensors(arch, r)
    peft_dir = _write_peft_lora(tmp_path / "peft", arch, tensors, r, alpha, wrapped)
    hub_dir = _adapterhub_lora(tmp_path / "hub", model, arch, tensors, r, alpha)

    info = model.inspect_adapter_dir(peft_dir)
    assert info.source_format == "peft"
    assert info.method == "lora"
    peft_name = model.load_adapter(peft_dir, load_as="peft")
    hub_name = model.load_adapter(hub_dir)
    cfg = model.adapters_config[peft_name]
    assert isinstance(cfg, LoRAConfig)
    assert (cfg.r, cfg.alpha, tuple(cfg.attn_matrices)) == (r, alpha, ("q", "v"))

    base = run(model, x)
    want = run(model, x, hub_name)
    got = run(model, x, peft_name)
    assert max_diff(want, base) > 1e-2
    assert max_diff(got, want) < 1e-6

    # and it is really the PEFT formula: h + (alpha / r) * x A^T B^T on query/value
    layer0 = LORA_TARGETS[arch][next(iter(LORA_TARGETS[arch]))][0].format(i=0)
    a, b = tensors[(0, next(iter(LORA_TARGETS[arch])))]
    lora = dict(model.base_model.named_modules())[layer0].loras[peft_name]
    assert torch.allclose(lora.delta_weight(), b @ a * (alpha / r))


def test_peft_lora_partial_layers(tmp_path: Path) -> None:
    """layers_to_transform-style files (only layer 1) load with layer 0 left out."""
    model = build("bert")
    x = make_inputs("bert")
    tensors = {k: v for k, v in _lora_tensors("bert", 4).items() if k[0] == 1}
    peft_dir = _write_peft_lora(tmp_path / "peft", "bert", tensors, 4, 8, wrapped=False, layers_to_transform=[1])
    name = model.load_adapter(peft_dir, load_as="p")
    assert tuple(model.adapters_config[name].leave_out) == (0,)
    full = _lora_tensors("bert", 4)
    zeroed = {k: (v if k[0] == 1 else (torch.zeros_like(v[0]), torch.zeros_like(v[1]))) for k, v in full.items()}
    hub = model.load_adapter(_adapterhub_lora(tmp_path / "hub", model, "bert", zeroed, 4, 8))
    assert max_diff(run(model, x, name), run(model, x, hub)) < 1e-6


def test_peft_lora_alpha_pattern_is_applied(tmp_path: Path) -> None:
    """PEFT's alpha_pattern overrides lora_alpha per module; a loader that ignores it computes a different
    function without any error, so it must either apply it or refuse the folder."""
    model = build("bert")
    x = make_inputs("bert")
    tensors = _lora_tensors("bert", 4)
    peft_dir = _write_peft_lora(tmp_path / "peft", "bert", tensors, 4, 8, wrapped=False,
                                alpha_pattern={"encoder.layer.0.attention.self.query": 32}, rank_pattern={})
    hub = model.load_adapter(_adapterhub_lora(tmp_path / "hub", model, "bert", tensors, 4, 8))
    try:
        name = model.load_adapter(peft_dir, load_as="p")
    except ValueError as err:
        assert "alpha_pattern" in str(err)
        assert not model.has_adapter("p")
        return
    # loaded: layer 0's query must use alpha 32, so it cannot equal the uniform alpha-8 adapter
    assert max_diff(run(model, x, name), run(model, x, hub)) > 1e-4


def test_peft_lora_rank_pattern_is_refused_or_applied(tmp_path: Path) -> None:
    model = build("bert")
    tensors = _lora_tensors("bert", 4)
    a, b = tensors[(0, "query")]
    tensors[(0, "query")] = (torch.cat([a, a[:1]]), torch.cat([b, b[:, :1]], dim=1))  # rank 5 there
    peft_dir = _write_peft_lora(tmp_path / "peft", "bert", tensors, 4, 8, wrapped=False,
                                rank_pattern={"encoder.layer.0.attention.self.query": 5})
    with pytest.raises(ValueError, match="(rank_pattern|wrong shape).*"):
        model.load_adapter(peft_dir, load_as="p")
    assert not model.has_adapter("p")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"use_rslora": True}, "rsLoRA"),
        ({"peft_type": "PREFIX_TUNING"}, "PREFIX_TUNING is not supported"),
        ({"peft_type": "LOHA"}, "LOHA is not supported"),
    ],
)
def test_peft_unsupported_variants(change: dict, message: str, tmp_path: Path) -> None:
    model = build("bert")
    tensors = _lora_tensors("bert", 4)
    peft_dir = _write_peft_lora(tmp_path / "peft", "bert", tensors, 4, 8, wrapped=False, **change)
    with pytest.raises(ValueError, match=message):
        model.load_adapter(peft_dir)
    assert not model.adapters_config


def test_peft_errors_name_the_key(tmp_path: Path) -> None:
    model = build("bert")
    tensors = _lora_tensors("bert", 4)
    # a module that is not a LoRA site
    folder = _write_peft_lora(tmp_path / "site", "bert", tensors, 4, 8, wrapped=False)
    state = {"base_model.model.pooler.dense.lora_A.weight": torch.zeros(4, HIDDEN),
             "base_model.model.pooler.dense.lora_B.weight": torch.zeros(HIDDEN, 4)}
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="pooler.dense"):
        model.load_adapter(folder)
    # a bias saved with bias="all"
    folder = _write_peft_lora(tmp_path / "bias", "bert", tensors, 4, 8, wrapped=False, bias="all")
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    state["base_model.model.encoder.layer.0.attention.self.query.bias"] = torch.zeros(HIDDEN)
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"attention\.self\.query\.bias"):
        model.load_adapter(folder)
    # lora_B missing for one module
    folder = _write_peft_lora(tmp_path / "half", "bert", tensors, 4, 8, wrapped=False)
    state = load_file(str(folder / "adapter_model.safetensors"))
    del state["base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"]
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.self\.value"):
        model.load_adapter(folder)
    # no weights file at all
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(ValueError, match="adapter_model.safetensors is missing"):
        model.load_adapter(tmp_path / "empty")
    assert not model.adapters_config


def test_peft_lora_on_fused_gpt2_attention_is_refused(tmp_path: Path) -> None:
    model = build("gpt2")
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True}))
    state = {}
    for i in range(N_LAYERS):
        state[f"base_model.model.h.{i}.attn.c_attn.lora_A.weight"] = _seeded((4, HIDDEN), i)
        state[f"base_model.model.h.{i}.attn.c_attn.lora_B.weight"] = _seeded((3 * HIDDEN, 4), i + 50)
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="fused projection"):
        model.load_adapter(folder)


# -- (IA)^3 -----------------------------------------------------------------------------------------------------


def _write_peft_ia3(folder: Path, vectors: dict[str, torch.Tensor], targets: list[str], feedforward: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "IA3", "task_type": None, "target_modules": targets, "feedforward_modules": feedforward,
        "fan_in_fan_out": False, "base_model_name_or_path": "tiny-random-bert", "inference_mode": True,
        "init_ia3_weights": True, "modules_to_save": None,
    }))
    save_file({f"base_model.model.{path}.ia3_l": v.contiguous() for path, v in vectors.items()},
              str(folder / "adapter_model.safetensors"))
    return folder


def test_peft_ia3_output_scaling_equals_adapterhub_ia3(tmp_path: Path) -> None:
    """PEFT (IA)^3 on key/value (not feed-forward): out = W x * l, l of shape (out, 1) -- AdapterHub's ia3 on k, v."""
    model = build("bert")
    x = make_inputs("bert")
    vectors = {}
    for i in range(N_LAYERS):
        for j, proj in enumerate(("key", "value")):
            vectors[f"encoder.layer.{i}.attention.self.{proj}"] = 1.0 + _seeded((HIDDEN, 1), 10 * i + j, 0.3)
    peft_dir = _write_peft_ia3(tmp_path / "peft", vectors, ["key", "value"], [])
    state = {f"bert.{path}.loras.hub.lora_B": v for path, v in vectors.items()}
    config = IA3Config(intermediate_lora=False)
    hub_dir = _write_adapterhub(tmp_path / "hub", model, "hub", config, state)

    name = model.load_adapter(peft_dir, load_as="p")
    hub = model.load_adapter(hub_dir)
    assert isinstance(model.adapters_config[name], IA3Config)
    assert tuple(model.adapters_config[name].attn_matrices) == ("k", "v")
    base = run(model, x)
    want = run(model, x, hub)
    assert max_diff(want, base) > 1e-3
    assert max_diff(run(model, x, name), want) < 1e-6


def test_peft_ia3_feedforward_input_scaling_is_refused(tmp_path: Path) -> None:
    model = build("bert")
    vectors = {f"encoder.layer.{i}.output.dense": torch.ones(1, 64) for i in range(N_LAYERS)}
    folder = _write_peft_ia3(tmp_path / "ff", vectors, ["output.dense"], ["output.dense"])
    with pytest.raises(ValueError, match="feed-forward"):
        model.load_adapter(folder)
    assert not model.adapters_config
