"""Heterogeneous batches: every row of a BatchSplit equals that row's setup run alone.

A row's output must never depend on the other rows: not on their adapters, not on their padding, not on
the attention implementation. Checked for every method on BERT, GPT-2 and Llama (GQA), under eager and
sdpa attention, with right padding (and left padding for the decoders), comparing only a row's valid
positions against the same row run alone without padding (tolerance 1e-5). Every test here runs under
the device check (device_check.py): index tensors on the weights' device, no host syncs in the layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from unittest import mock

import pytest
import torch

from adapters_core import AdapterSetup, Average, BatchSplit, Fuse, LoRAConfig, Parallel, Split, Stack
from adapters_core.methods import batching
from adapters_core.methods.bottleneck import apply as bottleneck_method
from adapters_core.methods.bottleneck.tree import BottleneckTree
from adapters_core.methods.lora import apply as lora_method

from .tiny_models import (
    ARCHS,
    ATTNS,
    DECODERS,
    METHODS,
    add_adapter,
    add_noise,
    build,
    hidden_states,
    max_abs,
    one_torch_thread,
    padded_inputs,
    row_alone,
    run,
    zoo,
)

pytestmark = pytest.mark.device_check

TOL = 1e-5
CHANGED = 1e-3  # an adapter that is applied moves the output by far more than this

# (arch, attention, padding side): BERT is only right-padded; decoders both ways.
CASES = [
    (arch, attn, side)
    for arch in ARCHS
    for attn in ATTNS
    for side in (("right", "left") if arch in DECODERS else ("right",))
]


# One padding side per architecture, for the tests that vary something else.
ONE_SIDE = [(arch, attn, "left" if arch in DECODERS else "right") for arch in ARCHS for attn in ATTNS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def _case_id(case: tuple[str, str, str]) -> str:
    return "-".join(case)


# (model, setup, row ids) -> the row's output alone; the model is kept in the value so its id stays unique.
_ALONE: dict[tuple, tuple[torch.nn.Module, torch.Tensor]] = {}


def _alone(model: torch.nn.Module, one: dict, setup: object) -> torch.Tensor:
    key = (id(model), repr(setup), tuple((k, tuple(v.flatten().tolist())) for k, v in sorted(one.items())))
    hit = _ALONE.get(key)
    if hit is None:
        hit = _ALONE[key] = (model, run(model, one, setup))
    return hit[1]


def _check_rows(model: torch.nn.Module, inputs: dict, setup: object, row_setups: list, label: str = "",
                grad: bool = False) -> torch.Tensor:
    """Run `setup` on the batch, then every row alone under `row_setups[i]`; compare valid positions.

    grad=True runs the batch with autograd recording (the training path: gathered bmm over adapters);
    otherwise it runs without (the inference path: in-place updates on each adapter's run of rows).
    """
    if grad:
        with torch.enable_grad(), AdapterSetup(setup):
            out = hidden_states(model(**inputs)).detach()
    else:
        out = run(model, inputs, setup)
    assert out.shape[0] == len(row_setups)
    for i, row_setup in enumerate(row_setups):
        alone = _alone(model, row_alone(inputs, i), row_setup)
        valid = inputs["attention_mask"][i].bool()
        diff = max_abs(out[i, valid], alone[0])
        assert diff < TOL, f"{label} row {i} ({row_setup!r}) differs from the row run alone by {diff:.3g}"
    return out


def _assert_applied(model: torch.nn.Module, inputs: dict, i: int, setup: object) -> None:
    """Row i under `setup` alone differs from the bare backbone (the adapter is not silently dropped)."""
    one = row_alone(inputs, i)
    diff = max_abs(_alone(model, one, setup), _alone(model, one, None))
    assert diff > CHANGED, f"{setup!r} leaves row {i} at the backbone output (diff {diff:.3g})"


# ---------------------------------------------------------------------------------------------------
# every method, every architecture, both attention implementations, right and left padding
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_row_alone_equals_row_in_padded_heterogeneous_batch(case: tuple[str, str, str], method: str) -> None:
    arch, attn, side = case
    model = zoo(arch, attn)
    # The method's adapter on a padded row and on a full row, next to a bare-backbone row, a prefix row
    # and a LoRA (for LoRA: IA3) row of other adapters, all of different lengths. On GPT-2, LoRA (q, v)
    # and IA3 (k, v) rows then cover different thirds of the fused c_attn.
    other = "ia3_0" if method == "lora" else "lora_0"
    rows = [method, None, "prefix_tuning_0", method, other]
    inputs = padded_inputs(arch, [4, 3, 6, 6, 5], side)
    label = f"{arch}/{attn}/{side}/{method}"
    _check_rows(model, inputs, BatchSplit(*rows, batch_sizes=[1] * len(rows)), rows, label)
    _assert_applied(model, inputs, 0, method)
    # The plain setup (not a BatchSplit) on the same padded batch: again every row equals the row alone.
    _check_rows(model, inputs, method, [method] * len(rows), label + " (plain setup)")


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", sorted({"prefix_tuning", "prefix_tuning_flat", "mam"}))
@pytest.mark.parametrize("arch", DECODERS)
def test_prefix_is_kept_under_sdpa_for_every_row_of_a_padded_batch(arch: str, method: str, side: str) -> None:
    """AdapterHub 1.3 drops the prefix on GPT-2/Llama under sdpa once a batch holds a padded row
    (every row then equals the backbone); here every row keeps it and equals the row alone."""
    model = zoo(arch, "sdpa")
    inputs = padded_inputs(arch, [6, 4, 6], side, seed=11)
    _check_rows(model, inputs, method, [method] * 3, f"{arch}/{method}")
    for i in range(3):
        _assert_applied(model, inputs, i, method)
    # ...and the prefix rows of the sdpa model equal those of the eager model.
    eager = run(zoo(arch, "eager"), inputs, method)
    sdpa = run(model, inputs, method)
    valid = inputs["attention_mask"].bool()
    assert max_abs(eager[valid], sdpa[valid]) < TOL


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_rows_without_an_attention_mask(arch: str, attn: str) -> None:
    """No attention_mask at all (sdpa may then use is_causal instead of a mask): prefix rows of different
    lengths and a bare row still equal the rows alone, and equal the same batch with an all-ones mask."""
    model = zoo(arch, attn)
    ids = padded_inputs(arch, [6, 6, 6], seed=71)["input_ids"]
    rows = ["prefix_tuning", None, "prefix_tuning_flat"]
    setup = BatchSplit(*rows, batch_sizes=[1, 1, 1])
    out = run(model, {"input_ids": ids}, setup)
    for i, row_setup in enumerate(rows):
        diff = max_abs(out[i], _alone(model, {"input_ids": ids[i:i + 1]}, row_setup)[0])
        assert diff < TOL, f"{arch}/{attn}: row {i} ({row_setup!r}) differs from the row alone by {diff:.3g}"
    masked = run(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, setup)
    assert max_abs(out, masked) < TOL


# ---------------------------------------------------------------------------------------------------
# one BatchSplit mixing methods and bare-backbone rows
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_batch_split_mixing_methods_and_base_rows(case: tuple[str, str, str]) -> None:
    arch, attn, side = case
    model = zoo(arch, attn)
    children = ["seq_bn", "lora", "prefix_tuning", "compacter", None, "compacter_pp", "ia3", "mam", "par_bn",
                "double_seq_bn", "prefix_tuning_flat"]
    sizes = [2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 1]
    row_setups = [c for c, n in zip(children, sizes, strict=True) for _ in range(n)]
    lengths = [3 + (3 * i) % 5 for i in range(len(row_setups))]  # 3..7: padded rows in most children
    inputs = padded_inputs(arch, lengths, side, seed=5)
    _check_rows(model, inputs, BatchSplit(*children, batch_sizes=sizes), row_setups, f"{arch}/{attn}/{side}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_batch_split_of_stacks_mixing_methods(case: tuple[str, str, str]) -> None:
    """Stacks of different methods as BatchSplit children (the flat row plan), plus a repeated adapter
    in non-contiguous slices and a bare row."""
    arch, attn, side = case
    model = zoo(arch, attn)
    children = [
        Stack("seq_bn_0", "lora_0"), "seq_bn_1", Stack("prefix_tuning_0", "seq_bn_1", "ia3_0"), None,
        Stack("lora_1", "compacter_pp_0"), "seq_bn_1", Stack("prefix_tuning_1", "prefix_tuning_2"),
    ]
    sizes = [1, 1, 2, 1, 1, 1, 1]
    row_setups = [c for c, n in zip(children, sizes, strict=True) for _ in range(n)]
    inputs = padded_inputs(arch, [5, 3, 6, 4, 6, 2, 6, 5], side, seed=9)
    _check_rows(model, inputs, BatchSplit(*children, batch_sizes=sizes), row_setups, f"{arch}/{attn}/{side}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_nested_batch_splits(case: tuple[str, str, str]) -> None:
    arch, attn, side = case
    model = zoo(arch, attn)
    inner = BatchSplit("lora_2", None, "prefix_tuning_3", batch_sizes=[1, 1, 1])
    setup = BatchSplit("seq_bn_2", inner, Stack("compacter_pp_1", inner), batch_sizes=[1, 3, 3])
    row_setups = ["seq_bn_2", "lora_2", None, "prefix_tuning_3",
                  Stack("compacter_pp_1", "lora_2"), "compacter_pp_1", Stack("compacter_pp_1", "prefix_tuning_3")]
    inputs = padded_inputs(arch, [4, 6, 2, 5, 3, 6, 4], side, seed=13)
    _check_rows(model, inputs, setup, row_setups, f"{arch}/{attn}/{side}")


# ---------------------------------------------------------------------------------------------------
# several adapters of the same method in one batch: the gathered (bmm) path
# ---------------------------------------------------------------------------------------------------


def _spy(module: object, name: str) -> mock._patch:
    return mock.patch.object(module, name, wraps=getattr(module, name))


def _assert_distinct(out: torch.Tensor, rows: list[int], label: str) -> None:
    """Full-length rows of the same ids under different adapters give different outputs (the gather picks
    each row's own weights)."""
    for a in rows:
        for b in rows:
            if a < b:
                assert max_abs(out[a], out[b]) > CHANGED, f"{label}: rows {a} and {b} got the same output"


PATHS = ["gathered-grad", "gathered", "segmented"]


def _choose_path(path: str, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Set up one of the three ways a mixed batch is computed; returns whether to record gradients.

    gathered-grad: autograd on (training); gathered: inference with per-run slicing switched off (what
    many adapters with a row each take); segmented: inference on each adapter's contiguous rows.
    """
    if path == "gathered":
        monkeypatch.setattr(batching, "SEGMENT_MAX_RUNS", 0)
    return path == "gathered-grad"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_four_seq_bn_and_four_lora_adapters_two_rows_each(case: tuple[str, str, str], path: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    arch, attn, side = case
    grad = _choose_path(path, monkeypatch)
    model = zoo(arch, attn)
    children = [f"{m}_{i}" for i in range(4) for m in ("seq_bn", "lora")]  # interleaved
    row_setups = [c for c in children for _ in range(2)]
    lengths = [3, 6] * 8  # each child: one padded row, one full row
    inputs = padded_inputs(arch, lengths, side, seed=17, same_ids=True)
    setup = BatchSplit(*children, batch_sizes=[2] * 8)
    if path != "segmented":
        with _spy(bottleneck_method, "_delta_gathered") as bn_spy, _spy(lora_method, "_gathered") as lora_spy:
            out = _check_rows(model, inputs, setup, row_setups, f"{arch}/{attn}/{side}", grad=grad)
        # One gathered matmul per location over all four adapters of each method, 2 rows per adapter.
        bn_calls = [c for c in bn_spy.call_args_list if len(c.args[0]) == 4]
        lora_calls = [c for c in lora_spy.call_args_list if len(c.args[0]) == 4]
        assert bn_calls, "the four seq_bn adapters did not share one gathered matmul"
        assert lora_calls, "the four LoRA adapters did not share one gathered matmul"
        assert all(c.args[2].shape[0] == 8 for c in bn_calls + lora_calls)
    else:
        with (_spy(bottleneck_method, "_run_segments") as bn_spy, _spy(lora_method, "_segmented_add") as lora_spy,
              _spy(bottleneck_method, "_delta_gathered") as bn_gather, _spy(lora_method, "_gathered") as lora_gather):
            out = _check_rows(model, inputs, setup, row_setups, f"{arch}/{attn}/{side}")
        # Each location hands all four adapters of a method to one call that updates their 2-row slices;
        # nothing is gathered.
        assert any(len(c.args[0]) == 4 for c in bn_spy.call_args_list), "seq_bn rows did not take the segmented path"
        assert any(len(c.args[0]) == 4 for c in lora_spy.call_args_list), "LoRA rows did not take the segmented path"
        assert not bn_gather.called and not lora_gather.called, "inference fell back to the gathered path"
    _assert_distinct(out, list(range(1, 16, 2)), f"{arch}/{attn}/{side}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["seq_bn", "compacter_pp", "lora", "ia3", "prefix_tuning"])
@pytest.mark.parametrize("case", ONE_SIDE, ids=_case_id)
def test_four_adapters_of_one_method_each_equal_their_single_runs(case: tuple[str, str, str], method: str,
                                                                  path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    arch, attn, side = case
    grad = _choose_path(path, monkeypatch)
    model = zoo(arch, attn)
    children = [f"{method}_{i}" for i in (2, 0, 3, 1)]
    row_setups = [c for c in children for _ in range(2)]
    inputs = padded_inputs(arch, [6, 4, 3, 6, 6, 5, 2, 6], side, seed=19, same_ids=True)
    lora_like = method in ("lora", "ia3")
    module = lora_method if lora_like else bottleneck_method
    if path == "segmented":
        name = "_segmented_add" if lora_like else "_run_segments"
    else:  # seq_bn, compacter++: delta form
        name = "_gathered" if lora_like else "_delta_gathered"
    with _spy(module, name) as spy:
        out = _check_rows(model, inputs, BatchSplit(*children, batch_sizes=[2] * 4), row_setups,
                          f"{arch}/{attn}/{side}/{method}", grad=grad)
    if method != "prefix_tuning":  # prefixes are gathered into one padded attention call instead
        assert any(len(c.args[0]) == 4 for c in spy.call_args_list), f"no {path} call over the 4 adapters"
    _assert_distinct(out, [0, 3, 4, 7], f"{arch}/{attn}/{side}/{method}")


# ---------------------------------------------------------------------------------------------------
# BatchSplit children that are tree compositions (Average, Split) next to other rows
# ---------------------------------------------------------------------------------------------------

# Regression (fixed in d307b96): composition_tree.BottleneckTree.compose applied the BatchSplit's first
# adapter's pre_forward to ALL rows and then let nested children apply theirs again (seq_bn:
# LN(LN(h+x)+x)); None rows kept the pre-applied hidden, and every row was post-processed with the last
# adapter of the whole setup. Parallel over such children (a BatchSplit after replication) was hit too.
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_split_with_average_child_rows_equal_alone(arch: str) -> None:
    model = zoo(arch, "eager")
    avg = Average("seq_bn_0", "seq_bn_1", weights=[1, 3])
    inputs = padded_inputs(arch, [5, 7, 3, 6], "right", seed=23)
    _check_rows(model, inputs, BatchSplit(avg, None, "seq_bn_2", batch_sizes=[2, 1, 1]),
                [avg, avg, None, "seq_bn_2"], arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_split_with_split_child_rows_equal_alone(arch: str) -> None:
    model = zoo(arch, "eager")
    split = Split("seq_bn_0", "seq_bn_1", splits=[3, 4])
    inputs = padded_inputs(arch, [7, 7, 7], "right", seed=29)
    _check_rows(model, inputs, BatchSplit(split, "par_bn", batch_sizes=[2, 1]), [split, split, "par_bn"], arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_parallel_with_average_child_equals_children_alone(arch: str) -> None:
    model = zoo(arch, "eager")
    avg = Average("seq_bn_0", "seq_bn_1")
    inputs = padded_inputs(arch, [5, 3], "right", seed=31)
    out = run(model, inputs, Parallel(avg, "par_bn"))
    valid = inputs["attention_mask"].bool()
    for k, child in enumerate((avg, "par_bn")):
        alone = run(model, inputs, child)
        diff = max_abs(out[2 * k:2 * k + 2][valid], alone[valid])
        assert diff < TOL, f"{arch}: Parallel copy {k} ({child!r}) differs from the child alone by {diff:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_fuse_rows_alone_take_the_interpreter_and_plain_rows_keep_the_gathered_path(
        arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A BatchSplit with a Fuse child among plain children: only the Fuse rows run through the tree
    interpreter; the plain bottleneck and LoRA rows share their gathered kernels; every row equals its
    setup alone."""
    monkeypatch.setattr(batching, "SEGMENT_MAX_RUNS", 0)
    model = build(arch, "eager")
    for seed, (name, config) in enumerate((("f0", "seq_bn"), ("f1", "seq_bn"), ("s0", "seq_bn"), ("s1", "seq_bn"),
                                           ("l0", "lora"), ("l1", "lora"))):
        add_adapter(model, name, config, seed=700 + seed)
    fuse = Fuse("f0", "f1")
    model.add_adapter_fusion(fuse)
    add_noise(model, [p for _, p in model.fusion_named_parameters(fuse)], seed=710)
    setup = BatchSplit("s0", Stack(fuse), "l0", "s1", "l1", batch_sizes=[2, 1, 1, 1, 2])
    row_setups = ["s0", "s0", fuse, "l0", "s1", "l1", "l1"]
    inputs = padded_inputs(arch, [5, 3, 6, 4, 6, 2, 5], "right", seed=53)
    with (_spy(bottleneck_method, "_delta_gathered") as bn_spy, _spy(lora_method, "_gathered") as lora_spy,
          mock.patch.object(BottleneckTree, "run", autospec=True, side_effect=BottleneckTree.run) as tree_spy):
        run(model, inputs, setup)
    assert tree_spy.called and all(c.args[2].shape[0] == 1 for c in tree_spy.call_args_list), \
        f"the tree interpreter ran on rows {sorted({c.args[2].shape[0] for c in tree_spy.call_args_list})}, not the Fuse row alone"
    assert any(len(c.args[0]) == 2 and c.args[2].shape[0] == 3 for c in bn_spy.call_args_list), \
        "the plain seq_bn rows (s0, s0, s1) did not share one gathered matmul"
    assert any(len(c.args[0]) == 2 and c.args[2].shape[0] == 3 for c in lora_spy.call_args_list), \
        "the plain LoRA rows (l0, l1, l1) did not share one gathered matmul"
    _check_rows(model, inputs, setup, row_setups, arch)


# Regression (fixed in d307b96): composition_tree.lora_tree's BatchSplit branch raised "LoRA rows inside a
# tree composition must all have an adapter" whenever any child produced a LoRA update.
@pytest.mark.parametrize("children", [
    (Average("lora_0", "lora_1"), "lora_2"),
    (Average("lora_0", "lora_1"), None),
    (Average("seq_bn_0", "seq_bn_1"), "lora_2"),  # the LoRA row is not even under the Average
], ids=["lora-average+lora", "lora-average+base", "bn-average+lora"])
def test_batch_split_with_average_child_and_lora_rows_equal_alone(children: tuple) -> None:
    model = zoo("bert", "eager")
    inputs = padded_inputs("bert", [5, 7, 3], "right", seed=37)
    _check_rows(model, inputs, BatchSplit(*children, batch_sizes=[2, 1]), [children[0], children[0], children[1]])


def test_zero_row_batch_split_children_are_allowed() -> None:
    """A child with batch size 0 contributes no rows; the others are unaffected."""
    model = zoo("llama", "sdpa")
    inputs = padded_inputs("llama", [6, 4, 5], "right", seed=41)
    setup = BatchSplit("seq_bn", "lora", "prefix_tuning", batch_sizes=[0, 2, 1])
    _check_rows(model, inputs, setup, ["lora", "lora", "prefix_tuning"])


# ---------------------------------------------------------------------------------------------------
# GPT-2's fused c_attn: LoRA/IA3 adapters enabled on different thirds (q, k, v)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_loras() -> torch.nn.Module:
    model = build("gpt2", "eager")
    add_adapter(model, "qv", "lora", seed=1)  # q and v thirds of c_attn
    for name, matrices, seed in (("k", ["k"], 2), ("qkv", ["q", "k", "v"], 3)):
        model.add_adapter(name, LoRAConfig(attn_matrices=matrices))
        add_noise(model, model.adapter_parameters(name), seed)
    return model


def test_lora_rows_with_all_and_some_thirds_of_fused_c_attn(gpt2_loras: torch.nn.Module) -> None:
    inputs = padded_inputs("gpt2", [5, 3, 5], "right", seed=43)
    _check_rows(gpt2_loras, inputs, BatchSplit("qkv", "qv", "qkv", batch_sizes=[1, 1, 1]), ["qkv", "qv", "qkv"])


# Regression (fixed in d307b96): Wiring._lora_hook only told out_index None from not-None, so LoRA on q,v
# next to LoRA on k (or IA3 on k,v) ran every row with one adapter's columns (a RuntimeError here; with
# lora + ia3 a silently wrong row, depending on PYTHONHASHSEED).
def test_lora_rows_with_different_attn_matrices_on_fused_c_attn(gpt2_loras: torch.nn.Module) -> None:
    inputs = padded_inputs("gpt2", [5, 3, 5], "right", seed=43)
    _check_rows(gpt2_loras, inputs, BatchSplit("qv", "k", "qv", batch_sizes=[1, 1, 1]), ["qv", "k", "qv"])


def test_stack_of_loras_on_fused_c_attn_is_refused_before_the_forward(gpt2_loras: torch.nn.Module) -> None:
    """A Stack of LoRAs on GPT-2's fused c_attn is refused with a ValueError naming the stack, before any
    tensor is touched. (Regression, fixed in d307b96: it used to be silently dropped -- the output equalled
    the bare backbone's.)"""
    calls: list[int] = []
    handle = gpt2_loras.base_model.get_input_embeddings().register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"Stack\('qkv', 'qv'\).*not supported"):
            run(gpt2_loras, padded_inputs("gpt2", [5], "right", seed=47), Stack("qkv", "qv"))
    finally:
        handle.remove()
    assert not calls, "the forward pass started before the ValueError"
