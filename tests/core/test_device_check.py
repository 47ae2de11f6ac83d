"""The device check itself (device_check.py), the fused-projection LoRA index on the layer's device, and
the host->device tensors of one forward: built once per forward, never once per layer."""

from __future__ import annotations

import pytest
import torch

from adapters_core import AdapterSetup, AutoAdapterModel, Average, BatchSplit
from adapters_core.methods.lora.targets import lora_targets
from adapters_core.routing import ForwardContext, forward_context

from .device_check import DeviceCheckError, device_check
from .tiny_models import add_adapter, build, padded_inputs, run, tiny_config


def _library_code(source: str, module: str, **names: object) -> dict:
    """Run `source` as if it were a line of `module` (the check tells library code by its module name)."""
    scope = {"__name__": module, "torch": torch, **names}
    exec(compile(source, f"{module.replace('.', '/')}.py", "exec"), scope)
    return scope


def test_a_host_tensor_reaching_a_kernel_fails_naming_the_op_and_the_line() -> None:
    weight = torch.randn(4, 3)
    with device_check(), pytest.raises(DeviceCheckError, match=r"aten\.index.*mixes devices.*adapters_core/methods/fake\.py:1"):
        _library_code("out = w[torch.tensor([0, 2])]", "adapters_core.methods.fake", w=weight)


def test_host_data_built_by_the_library_lands_on_the_host_device() -> None:
    with device_check():
        assert _library_code("t = torch.tensor([1])", "adapters_core.methods.fake")["t"].device.type == "meta"
        assert torch.tensor([1]).device.type == "cpu"  # the tests' own tensors are left alone


@pytest.mark.parametrize("source", ["bool(x.all())", "int(x[0])", "x.tolist()", "x.sum().item()"])
def test_a_host_sync_in_layer_code_during_a_forward_fails(source: str) -> None:
    x = torch.ones(3)
    with device_check():
        _library_code(source, "adapters_core.methods.fake", x=x)  # outside a forward: allowed
        with forward_context(ForwardContext(None, None)), pytest.raises(DeviceCheckError, match="host sync"):
            _library_code(source, "adapters_core.methods.fake", x=x)


def test_fused_projection_lora_index_lives_on_the_layer_device() -> None:
    model = build("gpt2")
    add_adapter(model, "qv", "lora[attn_matrices=[q,v]]", 1)
    add_adapter(model, "v", "ia3[attn_matrices=[v]]", 2)
    fused = [t for t in lora_targets(model._host) if t.fused]
    meta = torch.device("meta")
    assert fused and all(t.out_index("qv", meta).device == meta for t in fused)
    assert all(t.out_index("qv", meta) is t.out_index("qv", meta) for t in fused)  # once per device
    x = padded_inputs("gpt2", [4, 4, 4, 4])
    with device_check():
        run(model, x, BatchSplit("qv", "v", "qv", "v", batch_sizes=[1, 1, 1, 1]))


ADAPTERS = {
    "s1": "seq_bn", "s2": "seq_bn[init_weights=houlsby]", "l1": "lora", "l2": "lora[alpha=16]",
    "ia": "ia3", "p1": "prefix_tuning[prefix_length=3,bottleneck_size=16]", "p2": "prefix_tuning_flat[prefix_length=2]",
}


def _deep(arch: str, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_config(arch)
    config.num_hidden_layers = layers
    model = AutoAdapterModel.from_config(config, attn_implementation="eager").eval()
    for seed, (name, config_string) in enumerate(ADAPTERS.items()):
        add_adapter(model, name, config_string, seed)
    return model


def _per_forward(model: torch.nn.Module, arch: str) -> list[int]:
    """Host->device tensors of each of three forwards: inference, with autograd (the gathered path), a tree."""
    rows = [*ADAPTERS] * 3
    x = padded_inputs(arch, [5] * len(rows))
    flat = BatchSplit(*rows, batch_sizes=[1] * len(rows))
    tree = BatchSplit(Average("s1", "s2"), "l1", "p1", batch_sizes=[2, 2, 2])
    with device_check(count_only=True) as check:
        run(model, x, flat)
        with torch.enable_grad(), AdapterSetup(flat):
            model(**x)
        run(model, padded_inputs(arch, [5] * 6), tree)
    return check.per_forward()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_host_to_device_tensors_per_forward_do_not_grow_with_the_layers(arch: str) -> None:
    shallow, deep = _per_forward(_deep(arch, 2), arch), _per_forward(_deep(arch, 6), arch)
    assert shallow == deep, f"host->device tensors per forward: {shallow} with 2 layers, {deep} with 6"
