"""Spare modules: a load after a delete reuses the deleted adapter's modules and computes what a fresh load does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters_core import BatchSplit

from .conftest import add_noise, build, make_inputs, run, valid

ARCHS = ("bert", "gpt2", "llama")
METHODS = ("seq_bn", "lora", "prefix_tuning", "ia3", "par_bn")


def _spares(model: torch.nn.Module):  # noqa: ANN202 - the model's spare modules
    return model.adapters_registry.host.stack_cache.spares


def _saved(tmp_path: Path, arch: str, config: str, n: int) -> list[Path]:
    """n noisy adapters of one config, saved by a plain model."""
    src = build(arch)
    out = []
    for i in range(n):
        src.add_adapter(f"s{i}", config)
        add_noise(src, f"s{i}", seed=30 + i)
        src.save_adapter(str(tmp_path / f"s{i}"), f"s{i}")
        out.append(tmp_path / f"s{i}")
    return out


def _param_ids(model: torch.nn.Module, name: str) -> set[int]:
    return {id(p) for p in model.adapter_parameters(name)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", METHODS)
def test_a_load_after_a_delete_reuses_the_modules_and_equals_a_fresh_load(arch: str, config: str, tmp_path: Path) -> None:
    a, b = _saved(tmp_path, arch, config, 2)
    served, fresh = build(arch), build(arch)
    served.enable_adapter_slots()
    fresh.enable_adapter_slots()  # the same kernels: only the modules' history differs
    inputs = make_inputs(arch)
    served.load_adapter(str(a), load_as="a")
    before = _param_ids(served, "a")
    run(served, inputs, "a")  # a prefix computes (and caches) its keys and values
    served.delete_adapter("a")
    assert len(_spares(served)) > 0, "the deleted adapter's modules are kept"
    served.load_adapter(str(b), load_as="b")
    assert _param_ids(served, "b") <= before, "the load took the spare modules instead of building new ones"
    assert len(_spares(served)) == 0
    fresh.load_adapter(str(b), load_as="b")
    mask = valid(inputs)
    assert torch.equal(run(served, inputs, "b")[mask], run(fresh, inputs, "b")[mask]), "bit for bit what a fresh load computes"
    for p in served.adapter_parameters("b"):
        assert p.requires_grad and p.grad is None


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batches_over_reused_modules_equal_each_adapter_alone(arch: str, tmp_path: Path) -> None:
    folders = _saved(tmp_path, arch, "lora", 6)
    served = build(arch)
    served.enable_adapter_slots()
    for i, folder in enumerate(folders[:3]):
        served.load_adapter(str(folder), load_as=f"s{i}")
    for i, folder in enumerate(folders[3:], start=3):  # evict one, load the next into its modules
        served.delete_adapter(f"s{i - 3}")
        served.load_adapter(str(folder), load_as=f"s{i}")
    assert _spares(served).reused > 0
    inputs = make_inputs(arch, batch=3)
    mixed = run(served, inputs, BatchSplit("s3", "s4", "s5", batch_sizes=[1, 1, 1]))
    mask = valid(inputs)
    for row, name in enumerate(("s3", "s4", "s5")):
        alone = run(served, {k: v[row:row + 1] for k, v in inputs.items()}, name)
        torch.testing.assert_close(mixed[row:row + 1][mask[row:row + 1]], alone[mask[row:row + 1]], atol=1e-5, rtol=1e-5)


def test_add_adapter_never_reuses_a_spare() -> None:
    """Only a load (which writes every parameter) takes spares: a new adapter gets its own initialisation."""
    model = build("bert")
    model.enable_adapter_slots()
    model.add_adapter("a", "seq_bn")
    add_noise(model, "a")
    noisy = [p.detach().clone() for p in model.adapter_parameters("a")]
    model.delete_adapter("a")
    model.add_adapter("b", "seq_bn")
    assert _spares(model).reused == 0
    fresh = model.adapter_parameters("b")
    assert not any(torch.equal(x, y) for x, y in zip(noisy, fresh, strict=True) if x.dim() == 2)


def test_other_configs_and_phm_layers_are_never_handed_a_spare(tmp_path: Path) -> None:
    (seq,) = _saved(tmp_path / "seq", "bert", "seq_bn", 1)
    (wide,) = _saved(tmp_path / "wide", "bert", "seq_bn[reduction_factor=4]", 1)
    (compacter,) = _saved(tmp_path / "phm", "bert", "compacter[reduction_factor=8]", 1)
    model = build("bert")
    model.enable_adapter_slots()
    model.load_adapter(str(seq), load_as="a")
    model.delete_adapter("a")
    model.load_adapter(str(wide), load_as="w")
    model.load_adapter(str(compacter), load_as="c")
    assert _spares(model).reused == 0, "a different shape or a PHM layer builds new modules"
    model.delete_adapter("c")
    model.load_adapter(str(compacter), load_as="c2")
    assert _spares(model).reused == 0, "PHM layers hold their adapter's shared rule: never kept"


def test_spares_stay_within_their_share_of_the_stack_cache_bound(tmp_path: Path) -> None:
    folders = _saved(tmp_path, "bert", "seq_bn", 6)
    model = build("bert")
    model.enable_adapter_slots()
    one = None
    for i, folder in enumerate(folders):
        model.load_adapter(str(folder), load_as=f"s{i}")
        one = model.adapter_nbytes("s0")
    assert one is not None
    model.set_stack_cache_limit(4 * 2 * one)  # a quarter of it: room for the modules of about two adapters
    for i in range(6):
        model.delete_adapter(f"s{i}")
        assert _spares(model).nbytes <= _spares(model).limit_bytes
    assert 0 < _spares(model).nbytes <= 2 * one
    model.enable_adapter_slots(False)
    assert _spares(model).nbytes == 0 and len(_spares(model)) == 0
