"""AdapterFusion: add, train only the fusion layer, save/load, lifecycle with the fused adapters."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from adapters_core import AdapterSetup, AutoAdapterModel, Fuse


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = AutoAdapterModel.from_config(cfg).eval()
    for i, name in enumerate(("a", "b", "c")):
        torch.manual_seed(100 + i)
        model.add_adapter(name, "seq_bn")
        with torch.no_grad():
            for p in model.adapter_parameters(name):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hidden(model: torch.nn.Module, setup: object) -> torch.Tensor:
    with torch.no_grad(), AdapterSetup(setup):
        return model.base_model(**_inputs()).last_hidden_state


@pytest.mark.parametrize("config", ["dynamic", "static"])
def test_fusion_save_load_roundtrip(tmp_path, config: str) -> None:
    model = _model()
    model.add_adapter_fusion(Fuse("a", "b"), config=config)
    with torch.no_grad():
        for _, p in model.fusion_named_parameters(Fuse("a", "b")):
            p.add_(torch.randn_like(p) * 0.1)
    expected = _hidden(model, Fuse("a", "b"))
    assert not torch.allclose(expected, _hidden(model, "a"))
    model.save_adapter_fusion(tmp_path, Fuse("a", "b"))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["adapter_fusion_config.json", "model_adapter_fusion.safetensors"]

    fresh = _model()
    fuse = fresh.load_adapter_fusion(tmp_path)
    assert fuse == Fuse("a", "b")
    assert torch.equal(_hidden(fresh, fuse), expected)
    keys = [k for k, _ in fresh.fusion_named_parameters(fuse)]
    assert "bert.encoder.layer.0.output.adapter_fusion_layer.a,b.query.weight" in keys


def test_fusion_loads_over_renamed_adapters_and_inspects_without_touching_the_model(tmp_path) -> None:
    """A server keeps adapters under its own names: the fusion saved over (a, b) loads over copies of them
    named x and y under a third name, computes the same, and inspect_fusion_dir checks it on meta tensors."""
    model = _model()
    model.add_adapter_fusion(Fuse("a", "b"))
    with torch.no_grad():
        for _, p in model.fusion_named_parameters(Fuse("a", "b")):
            p.add_(torch.randn_like(p) * 0.1)
    expected = _hidden(model, Fuse("a", "b"))
    for name in ("a", "b"):
        model.save_adapter(tmp_path / name, name)
    model.save_adapter_fusion(tmp_path / "fusion", Fuse("a", "b"))

    server = _model()  # the same backbone
    for name in ("a", "b", "c"):
        server.delete_adapter(name)
    before = {k for k, _ in server.named_parameters()}
    info = server.inspect_fusion_dir(tmp_path / "fusion", [tmp_path / "a", tmp_path / "b"])
    assert info.adapter_names == ("a", "b")
    assert info.nbytes == model.fusion_nbytes(Fuse("a", "b")) > 0
    assert {k for k, _ in server.named_parameters()} == before

    server.load_adapter(str(tmp_path / "a"), load_as="x")
    server.load_adapter(str(tmp_path / "b"), load_as="y")
    fuse = server.load_adapter_fusion(tmp_path / "fusion", adapter_names=["x", "y"], load_as="f1")
    assert fuse == Fuse("x", "y", name="f1")
    assert (_hidden(server, fuse) - expected).abs().max() < 1e-6
    server.delete_adapter("y")
    assert not any("adapter_fusion_layer" in k for k, _ in server.named_parameters())


@pytest.mark.parametrize("damage", ["names", "keys", "config"])
def test_inspect_fusion_dir_names_what_is_wrong(tmp_path, damage: str) -> None:
    import json

    from safetensors.torch import load_file, save_file

    model = _model()
    model.add_adapter_fusion(Fuse("a", "b"))
    for name in ("a", "b", "c"):
        model.save_adapter(tmp_path / name, name)
    folder = tmp_path / "fusion"
    model.save_adapter_fusion(folder, Fuse("a", "b"))
    dirs = [tmp_path / "a", tmp_path / "b"]
    if damage == "names":
        dirs.append(tmp_path / "c")
        message = "fuses 2 adapters, 3 given"
    elif damage == "keys":
        state = load_file(str(folder / "model_adapter_fusion.safetensors"))
        key = next(k for k in state if ".query." in k)
        state[key.replace(".query.", ".quarry.")] = state.pop(key)
        save_file(state, str(folder / "model_adapter_fusion.safetensors"))
        message = "quarry"
    else:
        meta = json.loads((folder / "adapter_fusion_config.json").read_text())
        del meta["config"]
        (folder / "adapter_fusion_config.json").write_text(json.dumps(meta))
        message = "no `config`"
    with pytest.raises(ValueError, match=message):
        model.inspect_fusion_dir(folder, dirs)


def test_train_adapter_fusion_updates_only_fusion_layer() -> None:
    model = _model()
    model.add_adapter_fusion(Fuse("a", "b", "c"))
    fuse_params = dict(model.fusion_named_parameters(Fuse("a", "b", "c")))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    model.train_adapter_fusion(Fuse("a", "b", "c"))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_fusion_layer.a,b,c." in k for k in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(10):
        out = model.base_model(**_inputs()).last_hidden_state
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    assert changed and changed <= set(fuse_params)


def test_fusion_requires_bottleneck_adapters_and_existing_layer() -> None:
    model = _model()
    model.add_adapter("l", "lora")
    with pytest.raises(ValueError, match="not a bottleneck adapter"):
        model.add_adapter_fusion(Fuse("a", "l"))
    with pytest.raises(ValueError, match="no AdapterFusion layer"):
        _hidden(model, Fuse("a", "b"))
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        model.add_adapter_fusion(Fuse("a", "zz"))


@pytest.mark.parametrize("fuse", [Fuse("a", "b"), Fuse("a", "b", name="custom")], ids=["default-name", "custom-name"])
def test_deleting_a_fused_adapter_drops_the_fusion(fuse: Fuse) -> None:
    model = _model()
    baseline = {k for k, _ in model.named_parameters()}
    model.add_adapter_fusion(fuse)
    model.delete_adapter("b")
    assert not any("adapter_fusion_layer" in k for k, _ in model.named_parameters())
    with pytest.raises(ValueError, match="no adapter fusion"):
        model.delete_adapter_fusion(fuse)
    assert {k for k, _ in model.named_parameters()} == {k for k in baseline if ".adapters.b." not in k}


@pytest.mark.parametrize(("second", "where"), [
    ({"config": "double_seq_bn"}, "layer 0's mh_adapter location holds 'b' but not 'a'"),
    ({"config": "seq_bn[leave_out=[1]]"}, "layer 1's output_adapter location holds 'a' but not 'b'"),
], ids=["double_seq_bn", "leave_out"])
def test_fusing_adapters_at_different_locations_is_refused_when_added(second: dict, where: str) -> None:
    """AdapterHub refuses differing mh_adapter/output_adapter settings when the fusion is added; a fusion
    that could not fuse at some location must not wait for the first forward pass to fail."""
    model = _model()
    model.delete_adapter("b")
    model.add_adapter("b", **second)
    before = {k for k, _ in model.named_parameters()}
    with pytest.raises(ValueError, match=f"do not sit at the same locations: {where}"):
        model.add_adapter_fusion(Fuse("a", "b"))
    assert {k for k, _ in model.named_parameters()} == before


def test_seq_bn_fuses_with_par_bn_at_every_output_location() -> None:
    model = _model()
    model.add_adapter("p", "par_bn")
    model.add_adapter_fusion(Fuse("a", "p"))
    layers = {k.split(".adapter_fusion_layer.")[0] for k in dict(model.fusion_named_parameters(Fuse("a", "p")))}
    assert len(layers) == 2
    fused = _hidden(model, Fuse("a", "p"))
    assert torch.isfinite(fused).all() and not torch.allclose(fused, _hidden(model, "a"))
