"""Every adapter method on every supported architecture family: effect, save/load, delete, training.

Backbones are tiny random models (conftest.py): BERT, RoBERTa, GPT-2, and Llama/Mistral/Qwen2 with
grouped-query attention (4 query heads, 2 key/value heads). Compacter runs with reduction_factor=8: its
default 32 would give a bottleneck of 1 on hidden 32, which phm_dim=4 cannot divide (tested below).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters_core import AdapterSetup, BatchSplit, LoRAConfig, SeqBnConfig

from .conftest import ARCHS, add_noise, backbone_state, build, make_inputs, max_diff, run, valid

METHODS = {
    "seq_bn": "seq_bn",
    "double_seq_bn": "double_seq_bn",
    "par_bn": "par_bn",
    "compacter": "compacter[reduction_factor=8]",
    "compacter++": "compacter++[reduction_factor=8]",
    "prefix_tuning": "prefix_tuning",
    "prefix_tuning_flat": "prefix_tuning_flat",
    "lora": "lora",
    "ia3": "ia3",
    "mam": "mam",
    "prefix+lora": "prefix_tuning[prefix_length=4]|lora",
    "seq_bn_inv": "seq_bn_inv",
    "double_seq_bn_inv_glow": "double_seq_bn_inv[inv_adapter=glow]",
}
# Methods whose fresh initialisation is the identity (zero up-projection / zero B / unit vectors).
IDENTITY_AT_INIT = ("par_bn", "lora", "ia3")
# (arch, method) -> the only adapter module allowed to see an all-zero gradient (see the training test).
DEAD_RELU = {
    (arch, method): "layers.1.output_adapters.adapters.a."
    for arch in ("llama", "mistral", "qwen2") for method in ("seq_bn", "seq_bn_inv")
}

method_param = pytest.mark.parametrize("method", list(METHODS))
arch_param = pytest.mark.parametrize("arch", ARCHS)


def _with_adapter(arch: str, method: str, seed: int = 0, noise: bool = True) -> torch.nn.Module:
    model = build(arch, seed=seed)
    model.add_adapter("a", METHODS[method])
    if noise:
        add_noise(model, "a")
    return model


def _param_keys(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    return sorted(k for k, _ in model.named_parameters()), sorted(model.state_dict())


# -- (a) the adapter changes the output; inactive it changes nothing ---------------------------------------


@method_param
@arch_param
def test_adapter_changes_output(arch: str, method: str) -> None:
    model = build(arch)
    x = make_inputs(arch)
    base = run(model, x)
    model.add_adapter("a", METHODS[method])
    fresh = run(model, x, "a")
    if method in IDENTITY_AT_INIT:
        assert max_diff(fresh, base) < 1e-6, "a freshly initialised adapter of this kind must be the identity"
    add_noise(model, "a")
    out = run(model, x, "a")
    assert max_diff(out, base, valid(x)) > 1e-3
    assert torch.isfinite(out).all()
    # loaded but not active: bit-identical to the bare backbone
    assert torch.equal(run(model, x), base)
    # static activation is the same as the context
    model.set_active_adapters("a")
    with torch.no_grad():
        static = model(**x).last_hidden_state
    model.set_active_adapters(None)
    assert torch.equal(static, out)


@method_param
@arch_param
def test_grad_modes_agree(arch: str, method: str) -> None:
    """Inference takes its own paths (in-place updates, factored bottleneck updates, cached PHM products and
    prefixes); they must equal the autograd path, also under inference_mode and on a second (cached) call."""
    model = _with_adapter(arch, method).eval()
    x = make_inputs(arch)
    with AdapterSetup("a"):
        tracked = model(**x).last_hidden_state.detach()
        for _ in range(2):
            with torch.inference_mode():
                inference = model(**x).last_hidden_state
            assert max_diff(inference, tracked, valid(x)) < 1e-5
    assert max_diff(run(model, x, "a"), tracked, valid(x)) < 1e-5


# -- (b) save -> load into a fresh model ---------------------------------------------------------------------


@method_param
@arch_param
def test_save_load_roundtrip(arch: str, method: str, tmp_path: Path) -> None:
    model = _with_adapter(arch, method)
    x = make_inputs(arch)
    want = run(model, x, "a")
    model.save_adapter(tmp_path, "a")

    fresh = build(arch)  # same seed -> the same backbone
    name = fresh.load_adapter(tmp_path)
    assert name == "a"
    assert fresh.adapters_config["a"] == model.adapters_config["a"]
    saved, loaded = model.adapter_state_dict("a"), fresh.adapter_state_dict("a")
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert max_diff(run(fresh, x, "a"), want) < 1e-6

    # load_as renames every key; the output is the same
    other = fresh.load_adapter(tmp_path, load_as="renamed")
    assert other == "renamed"
    assert all(".renamed." in k and ".a." not in k for k in fresh.adapter_state_dict("renamed"))
    assert max_diff(run(fresh, x, "renamed"), want) < 1e-6


# -- (c) delete leaves nothing behind ------------------------------------------------------------------------


@method_param
@arch_param
def test_delete_leaves_no_parameter(arch: str, method: str) -> None:
    never = build(arch)
    x = make_inputs(arch)
    model = _with_adapter(arch, method)
    model.add_adapter("keep", "seq_bn")  # deleting one adapter must not touch another
    keep_before = {k: v.clone() for k, v in model.adapter_state_dict("keep").items()}
    n_before = len(list(model.parameters()))
    model.delete_adapter("a")
    assert not model.has_adapter("a")
    assert len(list(model.parameters())) < n_before
    assert not any(".a." in k for k in model.state_dict())
    keep_after = model.adapter_state_dict("keep")
    assert keep_after.keys() == keep_before.keys()
    assert all(torch.equal(keep_before[k], keep_after[k]) for k in keep_before)
    model.delete_adapter("keep")
    assert _param_keys(model) == _param_keys(never)
    assert torch.equal(run(model, x), run(never, x))
    # the name is free again, and a new adapter under it starts from scratch
    model.add_adapter("a", METHODS[method])
    assert model.has_adapter("a")
    with pytest.raises(ValueError, match="no adapter named 'missing'"):
        model.delete_adapter("missing")


def test_delete_active_adapter_clears_static_setup() -> None:
    model = build("bert")
    x = make_inputs("bert")
    model.add_adapter("a", "seq_bn")
    model.set_active_adapters("a")
    model.delete_adapter("a")
    assert model.active_adapters is None
    with torch.no_grad():
        out = model(**x).last_hidden_state
    assert torch.equal(out, run(build("bert"), x))


# -- (d) training touches only the adapter ------------------------------------------------------------------


@method_param
@arch_param
def test_training_updates_only_adapter(arch: str, method: str) -> None:
    model = _with_adapter(arch, method)
    x = make_inputs(arch)
    mask = valid(x)
    frozen_before = backbone_state(model, exclude="a")
    named = dict(model.adapter_named_parameters("a"))
    adapter_before = {k: p.detach().clone() for k, p in named.items()}

    model.train_adapter("a")
    assert model.training
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in named.values()}, "exactly the adapter's parameters are trainable"
    assert len(named) > 0

    target = torch.randn(*x["input_ids"].shape, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    # all parameters go to the optimizer: freezing, not the optimizer's list, must protect the backbone
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses: list[float] = []
    got_grad: set[str] = set()
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        out = model(**x).last_hidden_state  # the active setup comes from train_adapter
        loss = ((out - target) ** 2)[mask].mean()
        loss.backward()
        for key, p in named.items():
            assert p.grad is not None, f"{key} is not connected to the output"
            if p.grad.abs().sum() > 0:
                got_grad.add(key)
        frozen_grads = [k for k, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_grads, f"frozen parameters received gradients: {frozen_grads[:3]}"
        opt.step()
        losses.append(loss.item())
    model.eval()

    assert losses[-1] < 0.9995 * losses[0], f"loss did not fall: {losses[0]:.5f} -> {losses[-1]:.5f}"
    frozen_after = backbone_state(model, exclude="a")
    changed = [k for k in frozen_before if not torch.equal(frozen_before[k], frozen_after[k])]
    assert not changed, f"backbone tensors changed: {changed[:5]}"
    # Everything that received gradient moved (weight_decay=0, so nothing else may move), and
    # everything received gradient -- except where a ReLU bottleneck of width 2 (seq_bn: 32 / 16) has
    # both units dead for every token, which zeroes the gradient of that adapter's down projection and
    # up weight (measured: the Llama-family seq_bn's layer-1 output adapter with these seeds, seq_bn_inv's too:
    # the same bottleneck).
    moved = {k for k, p in named.items() if not torch.equal(p.detach(), adapter_before[k])}
    assert moved == got_grad
    no_grad = set(named) - got_grad
    if (arch, method) in DEAD_RELU:
        assert no_grad <= {k for k in named if DEAD_RELU[(arch, method)] in k}, sorted(no_grad)
    else:
        assert not no_grad, sorted(no_grad)


@pytest.mark.parametrize("config", ["compacter[reduction_factor=8,learn_phm=False]",
                                    "compacter++[reduction_factor=8,learn_phm=False,shared_phm_rule=False]"])
def test_train_adapter_keeps_fixed_phm_rule_frozen(config: str) -> None:
    model = build("bert")
    model.add_adapter("c", config)
    rules = {k: p for k, p in model.adapter_named_parameters("c") if "phm_rule" in k}
    assert rules and not any(p.requires_grad for p in rules.values())
    model.train_adapter("c")
    assert not any(p.requires_grad for p in rules.values()), sorted(k for k, p in rules.items() if p.requires_grad)


def _noisy_two_adapters(arch: str) -> torch.nn.Module:
    model = build(arch)
    model.add_adapter("a", "prefix_tuning[prefix_length=4]|lora")
    model.add_adapter("b", "double_seq_bn")
    add_noise(model, "a", sigma=0.15)
    add_noise(model, "b", sigma=0.15, seed=2)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_backbone_gets_half_precision_adapters_and_matches_float32(dtype: torch.dtype) -> None:
    """A backbone cast to bfloat16 or float16 runs its adapters in that dtype, and every output is within
    4 machine epsilons of the dtype, relative to the largest float32 output, of the same model in float32
    (measured on these models: at most 2.1 epsilons). Each adapter moves the output by more than twice that
    tolerance, so a dropped adapter would fail."""
    for arch in ("bert", "gpt2", "llama"):
        reference = _noisy_two_adapters(arch)
        model = _noisy_two_adapters(arch).to(dtype)
        assert all(p.dtype == dtype for n in "ab" for p in model.adapter_parameters(n))
        x = make_inputs(arch)
        mask = valid(x)
        bare = run(reference, x)
        for name in "ab":
            out, expected = run(model, x, name), run(reference, x, name)
            assert out.dtype == dtype
            tol = 4 * torch.finfo(dtype).eps * float(expected[mask].abs().max())
            assert max_diff(out.float(), expected, mask) <= tol, f"{arch}/{name}: {dtype} differs from float32"
            assert max_diff(expected, bare, mask) > 2 * tol, f"{arch}/{name}: the adapter barely changes the output"


def test_train_adapter_unknown_name_raises() -> None:
    model = build("bert")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.train_adapter("nope")


# -- mixed batches: same-shaped adapters share one gathered matmul -------------------------------------------

MIXED_PAIRS = {
    # same bottleneck signature (gelu, width 4): one PHM without bias, one Linear with bias
    "phm_nobias+linear": ("compacter++[reduction_factor=8,phm_bias=False]", "seq_bn[reduction_factor=8,non_linearity=gelu]"),
    "seq_bn+seq_bn": ("seq_bn", "seq_bn[init_weights=houlsby]"),
    "lora_alpha": ("lora[alpha=8]", "lora[alpha=32]"),
    "ia3+ia3": ("ia3", "ia3[alpha=2]"),
}


@pytest.mark.device_check
@pytest.mark.parametrize("order", ["ab", "ba"])
@pytest.mark.parametrize("pair", list(MIXED_PAIRS))
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_batch_split_rows_equal_each_adapter_alone(arch: str, pair: str, order: str) -> None:
    model = build(arch)
    x = make_inputs(arch, batch=4, pad_last=0)
    for name, config in zip("ab", MIXED_PAIRS[pair], strict=True):
        model.add_adapter(name, config)
        add_noise(model, name, seed=ord(name))
    base = model.base_model  # the plain backbone output (no prediction heads involved)
    alone = {n: run(base, x, n) for n in "ab"}
    assert max_diff(alone["a"], alone["b"]) > 1e-3
    mixed = run(base, x, BatchSplit(*order, batch_sizes=[2, 2]))
    for i, name in enumerate(order):
        rows = slice(2 * i, 2 * i + 2)
        assert max_diff(mixed[rows], alone[name][rows]) < 1e-5, f"rows of {name!r}"


# -- bad configurations -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("no_such_method", "unknown config name 'no_such_method'"),
        ("seq_bn[reduction_factor=16", r"unbalanced '\['"),
        ("lora[r=8,bogus=1]", "bogus"),
        ("lora[r=0]", r"LoRAConfig\.r=0"),
        ("seq_bn[non_linearity=nope]", "non_linearity='nope'"),
        ("lora[attn_matrices=[x]]", "attn_matrices"),
        ("seq_bn|seq_bn", "disjoint locations"),
        ("", "empty adapter config string"),
        ({"architecture": "lora", "bogus_field": 1}, "bogus_field"),
        ("compacter", "phm_dim=4 must divide"),  # default reduction 32 on hidden 32 -> bottleneck 1
        ("seq_bn[leave_out=[0,1]]", "places no adapter"),
        ("lora[leave_out=[0,1]]", "matches no layer"),
        ("prefix_tuning[leave_out=[0,1]]", "leaves out every layer"),
    ],
)
def test_bad_config_raises_and_leaves_nothing(config: object, message: str) -> None:
    model = build("bert")
    keys = sorted(model.state_dict())
    with pytest.raises(ValueError, match=message):
        model.add_adapter("x", config)
    assert not model.has_adapter("x")
    assert sorted(model.state_dict()) == keys


def test_bad_names_and_duplicates() -> None:
    model = build("gpt2")
    for bad in ("", "a.b", "spaces here", "slash/name"):
        with pytest.raises(ValueError, match="invalid adapter name"):
            model.add_adapter(bad)
    model.add_adapter("a", "lora")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("a", "seq_bn")
    model.add_adapter("a", "seq_bn", overwrite_ok=True)
    assert model.adapters_config["a"] == SeqBnConfig()
    assert not any(".loras." in k for k in model.adapter_state_dict("a"))


def test_config_objects_validate_fields() -> None:
    with pytest.raises(ValueError, match="r=0"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="attn_matrices"):
        LoRAConfig(attn_matrices=["z"])
    with pytest.raises(ValueError, match="no field"):
        LoRAConfig().replace(bogus=1)


def test_activating_unknown_adapter_raises_before_forward() -> None:
    model = build("llama")
    x = make_inputs("llama")
    model.add_adapter("a", "lora")
    with pytest.raises(ValueError, match="b"):
        model.set_active_adapters("b")
    with pytest.raises(ValueError), AdapterSetup("b"):
        model(**x)
