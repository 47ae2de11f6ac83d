"""The cross-forward cache of stacked adapter weights must never serve stale weights."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from adapters_core import AdapterSetup, AutoAdapterModel, BatchSplit
from adapters_core.methods import batching
from adapters_core.methods.bottleneck import apply as bottleneck_apply
from adapters_core.methods.lora import apply as lora_apply


@pytest.fixture(autouse=True)
def gathered_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make inference take the gathered (cached) path even for the few rows these tests use."""
    monkeypatch.setattr(batching, "SEGMENT_MAX_RUNS", 0)
    assert lora_apply.segment_runs is bottleneck_apply.segment_runs is batching.segment_runs  # one switch for both


def _model(method: str = "seq_bn") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = AutoAdapterModel.from_config(cfg).eval()
    for i in range(3):
        model.add_adapter(f"a{i}", method)
        with torch.no_grad():
            for p in model.adapter_parameters(f"a{i}"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _run(model: torch.nn.Module, setup: object, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), AdapterSetup(setup):
        return model.base_model(input_ids=ids).last_hidden_state.clone()


@pytest.mark.parametrize("method", ["seq_bn", "lora"])
def test_in_place_update_and_reload_invalidate_the_cache(tmp_path, method: str) -> None:
    model = _model(method)
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(1))
    split = BatchSplit("a0", "a1", "a2", batch_sizes=[1, 1, 1])
    first = _run(model, split, ids)
    assert torch.equal(_run(model, split, ids), first)  # second pass served from the cache

    with torch.no_grad():  # an in-place edit (what an optimizer step does) must be seen
        for p in model.adapter_parameters("a1"):
            p.mul_(2.0)
    after_edit = _run(model, split, ids)
    assert not torch.allclose(after_edit[1], first[1])
    assert torch.allclose(after_edit[1], _run(model, "a1", ids[1:2])[0], atol=1e-5)
    assert torch.equal(after_edit[0], first[0])

    model.save_adapter(tmp_path, "a0")  # reloading under the same name builds new parameters
    model.delete_adapter("a2")
    model.load_adapter(tmp_path, load_as="a2")
    reloaded = _run(model, split, ids)
    assert torch.allclose(reloaded[2], _run(model, "a0", ids[2:3])[0], atol=1e-5)


def test_computed_weights_bypass_the_cache_under_inference_mode() -> None:
    """Compacter's PHM weights are computed tensors (inference tensors have no version counter)."""
    model = _model()
    for i in range(2):
        model.add_adapter(f"c{i}", "compacter++[reduction_factor=8]")
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    out = _run(model, BatchSplit("c0", "c1", batch_sizes=[1, 1]), ids)
    assert torch.allclose(out[1], _run(model, "c1", ids[1:2])[0], atol=1e-5)


def test_phm_matrix_cache_sees_rule_and_factor_edits() -> None:
    """Compacter's H = sum kron(rule, W) is cached in eval mode; editing the shared rule must show."""
    model = _model()
    model.add_adapter("c", "compacter++[reduction_factor=8]")
    with torch.no_grad():
        for p in model.adapter_parameters("c"):
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(3))
    before = _run(model, "c", ids)
    assert torch.equal(_run(model, "c", ids), before)
    with torch.no_grad():
        rule = next(p for k, p in model.adapter_named_parameters("c") if k.endswith("phm_rule"))
        rule.mul_(3.0)
    assert not torch.allclose(_run(model, "c", ids), before)


@pytest.mark.parametrize("method", ["seq_bn", "lora"])
def test_many_batches_of_random_adapters_keep_the_cache_within_its_byte_limit(method: str) -> None:
    """The issue's scenario: 200 batches of 16 random adapters out of 40. The stacked copies of all sites
    together stay within the model's limit (here half the bytes of the 40 adapters), the cache is used,
    evictions never change a result, and deleting an adapter drops the stacks that hold it."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = AutoAdapterModel.from_config(cfg).eval()
    names = [f"a{i}" for i in range(40)]
    for name in names:
        model.add_adapter(name, method)
        with torch.no_grad():
            for p in model.adapter_parameters(name):
                p.add_(torch.randn_like(p) * 0.1)
    limit = sum(model.adapter_nbytes(n) for n in names) // 2
    model.set_stack_cache_limit(limit)
    rng = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 100, (16, 5), generator=rng)
    held = []
    for _ in range(200):
        rows = [names[int(i)] for i in torch.randint(0, len(names), (16,), generator=rng)]
        out = _run(model, BatchSplit(*rows, batch_sizes=[1] * 16), ids)
        held.append(model.stack_cache_nbytes())
    assert max(held) <= limit, f"held {max(held)} bytes over the limit of {limit}"
    assert min(held) > 0
    split = BatchSplit(*rows, batch_sizes=[1] * 16)
    assert torch.equal(_run(model, split, ids), out)  # served from the cache
    model.set_stack_cache_limit(0)
    assert model.stack_cache_nbytes() == 0
    assert torch.allclose(_run(model, split, ids), out, atol=1e-6)  # recomputed: the same result
    model.set_stack_cache_limit(limit)
    _run(model, split, ids)
    before = model.stack_cache_nbytes()
    model.delete_adapter(rows[0])
    assert model.stack_cache_nbytes() < before
