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
