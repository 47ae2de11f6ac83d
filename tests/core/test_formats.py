"""Adapter folders: the layout we write, and clear ValueErrors for every way a folder can be wrong."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_core.formats import read_adapter_dir

from .conftest import add_noise, build, make_inputs, max_diff, run

META_KEYS = {"config", "hidden_size", "model_type", "model_name", "model_class", "name", "version"}


def _saved(tmp_path: Path, arch: str = "bert", config: str = "seq_bn", name: str = "a") -> tuple[torch.nn.Module, Path]:
    model = build(arch)
    model.add_adapter(name, config)
    add_noise(model, name)
    folder = tmp_path / f"{arch}_{name}"
    model.save_adapter(folder, name)
    return model, folder


def _edit_tensors(folder: Path, fn) -> None:
    state = load_file(str(folder / "adapter.safetensors"))
    fn(state)
    save_file(state, str(folder / "adapter.safetensors"))


# -- what we write ---------------------------------------------------------------------------------------------


def test_saved_layout_bert_seq_bn(tmp_path: Path) -> None:
    model, folder = _saved(tmp_path, name="sent")
    assert sorted(os.listdir(folder)) == ["adapter.safetensors", "adapter_config.json"]
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert set(meta) == META_KEYS
    assert meta["name"] == "sent"
    assert meta["hidden_size"] == 32
    assert meta["model_type"] == "bert"
    assert meta["model_class"] == "BertAdapterModel"
    # AdapterHub's SeqBnConfig dict (no "architecture" key for bottlenecks, like AdapterHub writes it)
    assert (meta["config"]["output_adapter"], meta["config"]["mh_adapter"]) == (True, False)
    assert meta["config"]["reduction_factor"] == 16
    assert meta["config"]["original_ln_before"] is True
    keys = set(load_file(str(folder / "adapter.safetensors")))
    want = {
        f"bert.encoder.layer.{i}.output.adapters.sent.{p}"
        for i in range(2)
        for p in ("adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias")
    }
    assert keys == want
    assert keys == set(model.adapter_state_dict("sent"))


@pytest.mark.parametrize(
    ("arch", "config", "expected"),
    [
        ("bert", "lora", {"bert.encoder.layer.0.attention.self.query.loras.x.lora_A",
                          "bert.encoder.layer.1.attention.self.value.loras.x.lora_B"}),
        ("bert", "prefix_tuning", {"bert.prefix_tuning.prefix_tunings.x.self_prefix.wte.weight",
                                   "bert.prefix_tuning.prefix_tunings.x.self_prefix.control_trans.2.bias"}),
        ("bert", "compacter[reduction_factor=8]", {"bert.shared_parameters.x.phm_rule",
                                                   "bert.encoder.layer.0.attention.output.adapters.x.adapter_up.W_left"}),
        ("bert", "double_seq_bn", {"bert.encoder.layer.1.attention.output.adapters.x.adapter_down.0.weight"}),
        ("gpt2", "seq_bn", {"transformer.h.0.output_adapters.adapters.x.adapter_down.0.weight"}),
        ("gpt2", "lora", {"transformer.h.1.attn.c_attn.loras.x.lora_A"}),
        ("llama", "ia3", {"model.layers.0.self_attn.k_proj.loras.x.lora_B",
                          "model.layers.1.mlp.down_proj.loras.x.lora_B"}),
        ("llama", "double_seq_bn", {"model.layers.0.attention_adapters.adapters.x.adapter_up.weight"}),
    ],
)
def test_saved_keys_use_adapterhub_names(arch: str, config: str, expected: set[str], tmp_path: Path) -> None:
    _, folder = _saved(tmp_path, arch, config, name="x")
    keys = set(load_file(str(folder / "adapter.safetensors")))
    assert expected <= keys, sorted(expected - keys)


def test_init_model_and_adapter_model_share_files(tmp_path: Path) -> None:
    """A plain BertModel made adapter-capable by init() and a BertAdapterModel read each other's folders."""
    wrapped = build("bert", via_init=False)
    plain = build("bert", via_init=True)
    x = make_inputs("bert")
    plain.add_adapter("a", "lora")
    add_noise(plain, "a")
    plain.save_adapter(tmp_path / "from_plain", "a")
    assert all(k.startswith("bert.") for k in load_file(str(tmp_path / "from_plain" / "adapter.safetensors")))
    wrapped.load_adapter(tmp_path / "from_plain")
    assert max_diff(run(wrapped, x, "a"), run(plain, x, "a")) < 1e-6
    wrapped.save_adapter(tmp_path / "from_wrapped", "a")
    plain.load_adapter(tmp_path / "from_wrapped", load_as="b")
    assert max_diff(run(plain, x, "b"), run(plain, x, "a")) < 1e-6


@pytest.mark.parametrize("via_init", [False, True])
def test_inspect_checks_shapes_without_touching_the_model(via_init: bool, tmp_path: Path) -> None:
    """inspect_adapter_dir probes a meta-device copy of the architecture: the live model keeps exactly its
    modules and tensors, and a wrong shape is still found and named."""
    _, folder = _saved(tmp_path, config="mam")
    model = build("bert", via_init=via_init)
    model.add_adapter("live", "lora")
    add_noise(model, "live")
    modules_before = [n for n, _ in model.named_modules()]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect_adapter_dir added an adapter to the live model")

    model.add_adapter = refuse  # the probe must happen elsewhere; this instance must never grow one
    info = model.inspect_adapter_dir(folder)
    assert info.method == "mam" and info.n_params > 0 and info.nbytes == 4 * info.n_params
    key = "bert.encoder.layer.1.output.adapters.a.adapter_up.weight"
    _edit_tensors(folder, lambda st: st.__setitem__(key, torch.zeros(32, 3)))
    with pytest.raises(ValueError, match=r"wrong shape for .*layer[.]1[.]output[.]adapters[.].*adapter_up[.]weight"):
        model.inspect_adapter_dir(folder)
    assert [n for n, _ in model.named_modules()] == modules_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert all(p.device.type == "cpu" for p in model.parameters())


# -- what we refuse ---------------------------------------------------------------------------------------------


def test_wrong_shape_names_the_key(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    key = "bert.encoder.layer.1.output.adapters.a.adapter_up.weight"
    _edit_tensors(folder, lambda s: s.__setitem__(key, torch.zeros(32, 3)))
    fresh = build("bert")
    with pytest.raises(ValueError, match=rf"wrong shape for {key.replace('.', '[.]')}.*\(32, 3\).*\(32, 2\)"):
        fresh.load_adapter(folder)
    assert not fresh.has_adapter("a")
    assert not any(".adapters.a." in k for k in fresh.state_dict())


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    key = "bert.encoder.layer.0.output.adapters.a.surprise.weight"
    _edit_tensors(folder, lambda s: s.__setitem__(key, torch.zeros(2)))
    fresh = build("bert")
    with pytest.raises(ValueError, match=r"unexpected key.*adapters\.a\.surprise\.weight"):
        fresh.load_adapter(folder)
    assert not fresh.has_adapter("a")


def test_missing_key_names_the_key(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    key = "bert.encoder.layer.1.output.adapters.a.adapter_down.0.bias"
    _edit_tensors(folder, lambda s: s.pop(key))
    with pytest.raises(ValueError, match=r"missing key.*layer\.1\.output\.adapters\.a\.adapter_down\.0\.bias"):
        build("bert").load_adapter(folder)


def test_integer_tensor_names_the_key(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    key = "bert.encoder.layer.0.output.adapters.a.adapter_up.bias"
    _edit_tensors(folder, lambda s: s.__setitem__(key, torch.zeros(32, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"adapter_up\.bias must be a floating-point tensor"):
        build("bert").load_adapter(folder)


def test_half_precision_file_loads_into_float32_model(tmp_path: Path) -> None:
    model, folder = _saved(tmp_path)
    _edit_tensors(folder, lambda s: s.update({k: v.half() for k, v in s.items()}))
    fresh = build("bert")
    fresh.load_adapter(folder)
    assert all(p.dtype == torch.float32 for p in fresh.adapter_parameters("a"))
    x = make_inputs("bert")
    assert max_diff(run(fresh, x, "a"), run(model, x, "a")) < 1e-2


def test_hidden_size_mismatch(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["hidden_size"] = 64
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="hidden_size=64"):
        build("bert").load_adapter(folder)


def test_adapter_for_another_architecture_names_the_key(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path, arch="gpt2")
    llama = build("llama")
    with pytest.raises(ValueError, match=r"transformer\.h\.0"):
        llama.load_adapter(folder)
    assert not llama.adapters_config


def test_missing_files_are_named(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    model = build("bert")
    (folder / "adapter.safetensors").unlink()
    with pytest.raises(ValueError, match=r"adapter\.safetensors is missing"):
        model.load_adapter(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"adapter_config\.json is missing"):
        model.load_adapter(folder)
    with pytest.raises(ValueError, match="is not a directory"):
        model.load_adapter(tmp_path / "nowhere")
    assert not model.adapters_config


def test_head_config_without_head_weights(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    (folder / "head_config.json").write_text(json.dumps({"config": {"head_type": "classification"}, "name": "a"}))
    with pytest.raises(ValueError, match=r"model_head\.safetensors is missing"):
        read_adapter_dir(folder)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"adapter_config\.json is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({"name": "a"}), "needs the keys 'config' and 'name'"),
        (json.dumps({"name": "a", "config": {"architecture": "lora", "r": 0}}), r"r=0"),
        (json.dumps({"name": "a", "config": {"architecture": "warp_drive"}}), "warp_drive"),
    ],
)
def test_bad_adapter_config_json(content: str, message: str, tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    (folder / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        build("bert").load_adapter(folder)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    (folder / "adapter.safetensors").write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(ValueError, match=r"adapter\.safetensors could not be read"):
        build("bert").load_adapter(folder)


# -- pickles --------------------------------------------------------------------------------------------------


def _as_bin(folder: Path) -> Path:
    """AdapterHub's default layout: the same tensors as pytorch_adapter.bin."""
    state = load_file(str(folder / "adapter.safetensors"))
    (folder / "adapter.safetensors").unlink()
    torch.save(state, folder / "pytorch_adapter.bin")
    return folder


def test_bin_refused_without_allow_pickle(tmp_path: Path) -> None:
    model, folder = _saved(tmp_path)
    _as_bin(folder)
    fresh = build("bert")
    with pytest.raises(ValueError, match=r"pytorch_adapter\.bin is a pickle file"):
        fresh.load_adapter(folder, allow_pickle=False)
    with pytest.raises(ValueError, match="pickle"):
        fresh.inspect_adapter_dir(folder)  # inspecting defaults to allow_pickle=False
    with pytest.raises(ValueError, match="pickle"):
        read_adapter_dir(folder)  # and so does the reader
    assert not fresh.adapters_config
    # a trusted local folder: allowed on request (load_adapter's default), same function
    fresh.load_adapter(folder, allow_pickle=True)
    x = make_inputs("bert")
    assert max_diff(run(fresh, x, "a"), run(model, x, "a")) < 1e-6


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    model, folder = _saved(tmp_path)
    (folder / "pytorch_adapter.bin").write_bytes(b"never read")
    fresh = build("bert")
    fresh.load_adapter(folder, allow_pickle=False)
    x = make_inputs("bert")
    assert max_diff(run(fresh, x, "a"), run(model, x, "a")) < 1e-6


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # runs os.mkdir(marker) if anything ever unpickles this with full pickle
        return (os.mkdir, (self.marker,))


def test_malicious_bin_is_not_executed(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    marker = tmp_path / "pwned"
    state = load_file(str(folder / "adapter.safetensors"))
    (folder / "adapter.safetensors").unlink()
    with open(folder / "pytorch_adapter.bin", "wb") as f:
        pickle.dump({**state, "payload": _Payload(str(marker))}, f, protocol=2)
    model = build("bert")
    with pytest.raises(ValueError, match=r"pytorch_adapter\.bin"):
        model.load_adapter(folder, allow_pickle=True)
    assert not marker.exists()
    assert not model.adapters_config


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"garbage bytes", "could not be read"),
        ("list", "does not hold a state dict"),
        ("floats", "not named tensors"),
    ],
)
def test_bad_bin_contents(payload: object, message: str, tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    state = load_file(str(folder / "adapter.safetensors"))
    (folder / "adapter.safetensors").unlink()
    target = folder / "pytorch_adapter.bin"
    if payload == "list":
        torch.save([1, 2], target)
    elif payload == "floats":
        torch.save({k: 1.0 for k in state}, target)
    else:
        target.write_bytes(payload)
    model = build("bert")
    with pytest.raises(ValueError, match=message):
        model.load_adapter(folder, allow_pickle=True)
    assert not model.adapters_config


@pytest.mark.parametrize("config", ["seq_bn[ln_before=True]", "double_seq_bn[ln_before=True,ln_after=True]",
                                    "par_bn[ln_before=True]"])
def test_adapterhub_ln_before_aliases_load(config: str, tmp_path: Path) -> None:
    """AdapterHub saves model.state_dict(), where an ln_before LayerNorm appears twice: as
    adapter_norm_before.* and as adapter_down.0.* (the same module inside the Sequential). Such a .bin
    (AdapterHub's own safetensors save refuses the shared tensors) must load, not fail on the alias."""
    model = build("bert")
    model.add_adapter("a", config)
    add_noise(model, "a")
    hub_state = {k: v for k, v in model.state_dict().items() if ".adapters.a." in k}
    assert any(".adapter_down.0." in k for k in hub_state) and any(".adapter_norm_before." in k for k in hub_state)
    folder = tmp_path / "hub"
    model.save_adapter(tmp_path / "ours", "a")
    folder.mkdir()
    (folder / "adapter_config.json").write_text((tmp_path / "ours" / "adapter_config.json").read_text())
    torch.save(hub_state, folder / "pytorch_adapter.bin")
    fresh = build("bert")
    fresh.load_adapter(folder, allow_pickle=True)
    x = make_inputs("bert")
    assert max_diff(run(fresh, x, "a"), run(model, x, "a")) < 1e-6
    # an alias that disagrees with its twin is not silently dropped
    key = next(k for k in hub_state if k.endswith(".adapter_down.0.weight"))
    hub_state[key] = hub_state[key] + 1.0
    torch.save(hub_state, folder / "pytorch_adapter.bin")
    with pytest.raises(ValueError, match=r"adapter_down\.0\.weight"):
        build("bert").load_adapter(folder, allow_pickle=True)
