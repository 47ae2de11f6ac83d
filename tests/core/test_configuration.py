"""Tests for adapters_core.configuration: names, defaults, strings, validation, AdapterHub JSON."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest

from adapters_core import (
    AdapterConfig,
    AdapterConfigBase,
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    ConfigUnion,
    DoubleSeqBnConfig,
    DoubleSeqBnInvConfig,
    DynamicAdapterFusionConfig,
    HoulsbyConfig,
    IA3Config,
    LoRAConfig,
    MAMConfig,
    ParallelConfig,
    ParBnConfig,
    PfeifferConfig,
    PrefixTuningConfig,
    SeqBnConfig,
    SeqBnInvConfig,
    method_kinds,
    method_name,
)
from adapters_core.configuration import ADAPTER_CONFIG_NAMES
from adapters_core.methods.bottleneck import config as bn_config

SHARED = Path(__file__).resolve().parents[2].parent / "shared"  # ../shared beside the checkout (also in CI)
REFERENCE_FILES = sorted(SHARED.glob("reference/*/adapter_safetensors/adapter_config.json")) + sorted(
    SHARED.glob("reference_decoders/*/*/adapter_safetensors/adapter_config.json")
)

# The "config" object AdapterHub 1.3 writes for SeqBnConfig() (checked against its source).
SEQ_BN_DICT: dict[str, Any] = {
    "adapter_residual_before_ln": False,
    "cross_adapter": False,
    "dropout": 0.0,
    "factorized_phm_W": True,
    "factorized_phm_rule": False,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "init_weights": "bert",
    "init_weights_seed": None,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "is_parallel": False,
    "learn_phm": True,
    "leave_out": [],
    "ln_after": False,
    "ln_before": False,
    "mh_adapter": False,
    "non_linearity": "relu",
    "original_ln_after": True,
    "original_ln_before": True,
    "output_adapter": True,
    "phm_bias": True,
    "phm_c_init": "normal",
    "phm_dim": 4,
    "phm_init_range": 0.0001,
    "phm_layer": False,
    "phm_rank": 1,
    "reduction_factor": 16,
    "residual_before_ln": True,
    "scaling": 1.0,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "stochastic_depth": 0.0,
    "use_gating": False,
}
LORA_DICT: dict[str, Any] = {
    "architecture": "lora",
    "selfattn_lora": True,
    "intermediate_lora": False,
    "output_lora": False,
    "leave_out": [],
    "r": 8,
    "alpha": 8,
    "dropout": 0.0,
    "attn_matrices": ["q", "v"],
    "composition_mode": "add",
    "init_weights": "lora",
    "init_weights_seed": None,
    "use_gating": False,
    "use_dora": False,
    "vera_d": None,
    "vera_b": None,
    "dtype": None,
}
PREFIX_DICT: dict[str, Any] = {
    "architecture": "prefix_tuning",
    "encoder_prefix": True,
    "cross_prefix": True,
    "leave_out": [],
    "flat": False,
    "prefix_length": 30,
    "bottleneck_size": 512,
    "non_linearity": "tanh",
    "dropout": 0.0,
    "use_gating": False,
    "shared_gating": True,
    "init_weights_seed": None,
}


# ---------------------------------------------------------------------------------------------------
# names, classes, defaults
# ---------------------------------------------------------------------------------------------------

NAME_CASES = [
    ("seq_bn", SeqBnConfig, "seq_bn"),
    ("pfeiffer", SeqBnConfig, "seq_bn"),
    ("double_seq_bn", DoubleSeqBnConfig, "double_seq_bn"),
    ("houlsby", DoubleSeqBnConfig, "double_seq_bn"),
    ("par_bn", ParBnConfig, "par_bn"),
    ("parallel", ParBnConfig, "par_bn"),
    ("compacter", CompacterConfig, "compacter"),
    ("compacter++", CompacterPlusPlusConfig, "compacter++"),
    ("prefix_tuning", PrefixTuningConfig, "prefix_tuning"),
    ("prefix_tuning_flat", PrefixTuningConfig, "prefix_tuning"),
    ("lora", LoRAConfig, "lora"),
    ("ia3", IA3Config, "ia3"),
    ("mam", MAMConfig, "mam"),
    ("seq_bn_inv", SeqBnInvConfig, "seq_bn_inv"),
    ("pfeiffer+inv", SeqBnInvConfig, "seq_bn_inv"),
    ("double_seq_bn_inv", DoubleSeqBnInvConfig, "double_seq_bn_inv"),
    ("houlsby+inv", DoubleSeqBnInvConfig, "double_seq_bn_inv"),
]


@pytest.mark.parametrize(("name", "cls", "label"), NAME_CASES)
def test_every_name_gives_its_class(name: str, cls: type, label: str) -> None:
    config = AdapterConfigBase.load(name)
    assert type(config) is cls
    assert method_name(config) == label
    assert config == ADAPTER_CONFIG_NAMES[name]()
    assert AdapterConfigBase.load(name.upper()) == config  # names are case-insensitive


def test_every_registered_name_is_tested() -> None:
    assert {n for n, _, _ in NAME_CASES} == set(ADAPTER_CONFIG_NAMES)


def test_aliases() -> None:
    assert AdapterConfig is BnConfig
    assert PfeifferConfig is SeqBnConfig
    assert HoulsbyConfig is DoubleSeqBnConfig
    assert ParallelConfig is ParBnConfig


def test_seq_bn_defaults_equal_adapterhub_dict() -> None:
    assert SeqBnConfig().to_dict() == SEQ_BN_DICT
    assert "architecture" not in SeqBnConfig().to_dict()


def test_bottleneck_defaults() -> None:
    d = DoubleSeqBnConfig()
    assert (d.mh_adapter, d.output_adapter, d.non_linearity, d.reduction_factor) == (True, True, "swish", 16)
    assert d.original_ln_before is False
    p = ParBnConfig()
    assert (p.mh_adapter, p.output_adapter, p.non_linearity, p.reduction_factor) == (False, True, "relu", 2)
    assert (p.init_weights, p.is_parallel, p.scaling) == ("mam_adapter", True, 4.0)
    c = CompacterConfig()
    assert (c.mh_adapter, c.output_adapter, c.phm_layer, c.reduction_factor, c.non_linearity) == (
        True,
        True,
        True,
        32,
        "gelu",
    )
    cpp = CompacterPlusPlusConfig()
    assert (cpp.mh_adapter, cpp.output_adapter, cpp.original_ln_before, cpp.phm_layer) == (
        False,
        True,
        True,
        True,
    )
    assert (cpp.reduction_factor, cpp.non_linearity) == (32, "gelu")
    assert (c.phm_dim, c.phm_rank, c.phm_init_range, c.shared_phm_rule, c.factorized_phm_W) == (
        4,
        1,
        1e-4,
        True,
        True,
    )


def test_prefix_and_lora_defaults() -> None:
    assert PrefixTuningConfig().to_dict() == PREFIX_DICT
    assert AdapterConfigBase.load("prefix_tuning_flat").flat is True
    assert LoRAConfig().to_dict() == LORA_DICT
    assert LoRAConfig().scaling == 1.0
    assert LoRAConfig(r=4, alpha=16).scaling == 4.0
    ia3 = IA3Config()
    assert (ia3.r, ia3.alpha, ia3.attn_matrices, ia3.composition_mode, ia3.init_weights) == (
        1,
        1,
        ("k", "v"),
        "scale",
        "ia3",
    )
    assert ia3.intermediate_lora is True
    assert ia3.to_dict()["architecture"] == "lora"


def test_mam_is_prefix_plus_parallel_bottleneck() -> None:
    mam = MAMConfig()
    assert mam == ConfigUnion(PrefixTuningConfig(bottleneck_size=800), ParBnConfig())
    assert mam.prefix_tuning.bottleneck_size == 800
    assert isinstance(mam.adapter, ParBnConfig)
    assert mam.to_dict() == {
        "architecture": "union",
        "configs": [{**PREFIX_DICT, "bottleneck_size": 800}, ParBnConfig().to_dict()],
    }
    assert method_kinds(mam) == {"prefix_tuning", "bottleneck"}
    assert mam.methods() == mam.configs
    with pytest.raises(ValueError, match="PrefixTuningConfig"):
        MAMConfig(prefix_tuning=LoRAConfig())  # type: ignore[arg-type]


def test_methods_and_kinds_of_single_configs() -> None:
    lora = LoRAConfig()
    assert lora.methods() == (lora,)
    assert method_kinds(IA3Config()) == {"lora"}
    assert method_kinds(SeqBnConfig()) == {"bottleneck"}


def test_method_name_bottleneck_fallback() -> None:
    assert method_name(
        BnConfig(mh_adapter=True, output_adapter=False, reduction_factor=4, non_linearity="relu")
    ) == ("bottleneck")
    assert method_name(AdapterConfigBase.load("prefix_tuning|lora")) == "union"


def test_reduction_factor_per_layer() -> None:
    config = SeqBnConfig(reduction_factor={0: 8, "default": 16})
    assert config.reduction_factor_for(0) == 8
    assert config.reduction_factor_for(5) == 16
    assert config.reduction_factor_for(5) == 16
    assert config.to_dict()["reduction_factor"] == {"0": 8, "default": 16}
    assert hash(config) == hash(SeqBnConfig(reduction_factor={"0": 8, "default": 16}))
    assert SeqBnConfig().reduction_factor_for(3) == 16
    no_default = SeqBnConfig(reduction_factor={"1": 4})
    with pytest.raises(ValueError, match="layer 0"):
        no_default.reduction_factor_for(0)
    with pytest.raises(ValueError, match="reduction_factor"):
        SeqBnConfig(reduction_factor={"x": 4})
    with pytest.raises(ValueError, match="reduction_factor"):
        SeqBnConfig(reduction_factor={"0": -1})


# ---------------------------------------------------------------------------------------------------
# strings
# ---------------------------------------------------------------------------------------------------


def test_string_overrides() -> None:
    assert AdapterConfigBase.load("lora[r=4,alpha=16]") == LoRAConfig(r=4, alpha=16)
    assert AdapterConfigBase.load("par_bn[reduction_factor=8]").reduction_factor == 8
    assert AdapterConfigBase.load("seq_bn[leave_out=[0,1]]").leave_out == (0, 1)
    assert AdapterConfigBase.load("seq_bn[non_linearity=gelu]").non_linearity == "gelu"
    assert AdapterConfigBase.load("seq_bn[ dropout = 0.1 , ln_after=True ]") == SeqBnConfig(
        dropout=0.1, ln_after=True
    )
    assert AdapterConfigBase.load("lora[attn_matrices=[q,k,'v'],init_weights_seed=None]").attn_matrices == (
        "q",
        "k",
        "v",
    )
    assert AdapterConfigBase.load("seq_bn[leave_out=[]]").leave_out == ()
    assert AdapterConfigBase.load("prefix_tuning[flat=true,prefix_length=5]") == PrefixTuningConfig(
        flat=True, prefix_length=5
    )
    assert AdapterConfigBase.load("lora", r=2).r == 2  # keyword overrides on top of a string


def test_string_union() -> None:
    union = AdapterConfigBase.load("prefix_tuning[bottleneck_size=800]|par_bn")
    assert isinstance(union, ConfigUnion)
    assert union == MAMConfig()
    assert method_name(union) == "mam"
    assert (
        AdapterConfigBase.load(
            "prefix_tuning[bottleneck_size=64,prefix_length=8]|par_bn[reduction_factor=8]"
        ).to_dict()
        == (
            json.loads((SHARED / "reference/mam/adapter_safetensors/adapter_config.json").read_text())[
                "config"
            ]
        )
    )
    three = AdapterConfigBase.load("mam|lora")  # nested unions flatten
    assert [method_name(c) for c in three.methods()] == ["prefix_tuning", "par_bn", "lora"]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nope", "unknown config name 'nope'"),
        ("lora[r=4", "unbalanced '['"),
        ("lora]", "unbalanced ']'"),
        ("seq_bn[leave_out=[0,1]", "unbalanced '['"),
        ("lora[rank=4]", "no field(s) ['rank']"),
        ("lora[r=abc]", "LoRAConfig.r must be int, got 'abc'"),
        ("lora[r=1.5]", "LoRAConfig.r must be int, got 1.5"),
        ("seq_bn[ln_after=maybe]", "SeqBnConfig.ln_after must be bool, got 'maybe'"),
        ("seq_bn[leave_out=[a]]", "leave_out"),
        ("lora[r]", "bad override 'r'"),
        ("lora[=4]", "bad override '=4'"),
        ("lora[r=4,r=5]", "'r' given twice"),
        ("lora[r=@]", "cannot parse value '@'"),
        ("", "empty adapter config string"),
        ("lora||ia3", "cannot parse ''"),
        ("lora|ia3", "both 'lora' configs"),
        ("seq_bn|par_bn", "both sit at ['output_adapter']"),
        ("seq_bn[non_linearity=banana]", "non_linearity='banana'"),
    ],
)
def test_bad_strings_name_the_problem(spec: str, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        AdapterConfigBase.load(spec)
    assert needle in str(info.value)


def test_load_rejects_other_types_and_wrong_class() -> None:
    with pytest.raises(ValueError, match="cannot load"):
        AdapterConfigBase.load(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is a LoRAConfig"):
        BnConfig.load("lora")
    assert LoRAConfig.load("ia3") == IA3Config()


def test_bottleneck_union_at_disjoint_locations() -> None:
    union = AdapterConfigBase.load("seq_bn[mh_adapter=true,output_adapter=false]|seq_bn")
    assert len(union.methods()) == 2
    assert AdapterConfigBase.from_dict(union.to_dict()) == union


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: SeqBnConfig(reduction_factor=0), "reduction_factor=0"),
        (lambda: SeqBnConfig(dropout=1.0), "dropout=1.0"),
        (lambda: SeqBnConfig(dropout=-0.1), "dropout=-0.1"),
        (lambda: SeqBnConfig(phm_dim=0), "phm_dim=0"),
        (lambda: SeqBnConfig(non_linearity="nope"), "non_linearity='nope'"),
        (lambda: SeqBnConfig(init_weights="xavier"), "init_weights='xavier'"),
        (lambda: SeqBnConfig(residual_before_ln="pre_add"), "residual_before_ln='pre_add'"),
        (lambda: SeqBnConfig(scaling="learned"), "not supported by adapterserve"),
        (lambda: SeqBnConfig(scaling="channel"), "scaling='channel'"),
        (lambda: SeqBnConfig(use_gating=True), "use_gating=True"),
        (lambda: SeqBnConfig(inv_adapter="realnvp"), "inv_adapter='realnvp'"),
        (lambda: SeqBnConfig(leave_out=[-1]), "leave_out"),
        (lambda: SeqBnConfig(mh_adapter=False, output_adapter=False), "at least one of"),
        (lambda: SeqBnConfig(phm_c_init="zeros"), "phm_c_init='zeros'"),
        (lambda: SeqBnConfig(reduction_factor=True), "reduction_factor must be"),
        (lambda: LoRAConfig(r=0), "r=0"),
        (lambda: LoRAConfig(alpha=0), "alpha=0"),
        (lambda: LoRAConfig(attn_matrices=["q", "x"]), "['x']"),
        (lambda: LoRAConfig(attn_matrices=["q", "q"]), "unique"),
        (lambda: LoRAConfig(composition_mode="mul"), "composition_mode='mul'"),
        (lambda: LoRAConfig(composition_mode="scale", r=4), "requires r=1"),
        (lambda: LoRAConfig(use_dora=True), "use_dora=True: DoRA is not supported by adapterserve"),
        (lambda: LoRAConfig(vera_d=0.1), "vera_d=0.1"),
        (lambda: LoRAConfig(vera_b=0.0), "vera_b=0.0"),
        (lambda: LoRAConfig(use_gating=True), "not supported by adapterserve"),
        (lambda: LoRAConfig(init_weights="vera"), "init_weights='vera'"),
        (lambda: PrefixTuningConfig(prefix_length=0), "prefix_length=0"),
        (lambda: PrefixTuningConfig(bottleneck_size=0), "bottleneck_size=0"),
        (lambda: PrefixTuningConfig(use_gating=True), "use_gating=True"),
        (lambda: PrefixTuningConfig(dropout=2), "dropout=2"),
        (lambda: PrefixTuningConfig(flat="yes"), "PrefixTuningConfig.flat must be bool"),
        (lambda: ConfigUnion(), "at least one config"),
        (lambda: ConfigUnion(LoRAConfig(), "x"), "must be adapter configs"),
        (lambda: ConfigUnion(PrefixTuningConfig(), PrefixTuningConfig(flat=True)), "both 'prefix_tuning'"),
        (lambda: DynamicAdapterFusionConfig(dropout_prob=1.5), "dropout_prob=1.5"),
    ],
)
def test_invalid_values_raise_naming_field_and_value(make: Any, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        make()
    assert needle in str(info.value)


def test_non_linearity_is_case_insensitive() -> None:
    assert SeqBnConfig(non_linearity="ReLU").non_linearity == "ReLU"
    assert SeqBnConfig(non_linearity="identity").non_linearity == "identity"


def test_frozen() -> None:
    config = SeqBnConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.reduction_factor = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoRAConfig().r = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        MAMConfig().configs = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        SeqBnConfig(reduction_factor={"0": 8}).reduction_factor["0"] = 2  # type: ignore[index]
    assert isinstance(SeqBnConfig(leave_out=[1, 2]).leave_out, tuple)


def test_replace_validates_and_keeps_class() -> None:
    config = SeqBnConfig().replace(reduction_factor=8)
    assert type(config) is SeqBnConfig and config.reduction_factor == 8
    with pytest.raises(ValueError, match="reduction_factor=-1"):
        SeqBnConfig().replace(reduction_factor=-1)
    with pytest.raises(ValueError, match=r"no field\(s\) \['bogus'\]"):
        SeqBnConfig().replace(bogus=1)
    union = MAMConfig().replace(leave_out=[0])
    assert all(c.leave_out == (0,) for c in union.methods())
    assert MAMConfig().replace(reduction_factor=8).methods()[1].reduction_factor == 8
    with pytest.raises(ValueError, match="bogus"):
        MAMConfig().replace(bogus=1)


def test_equality_and_hash_are_by_value() -> None:
    assert SeqBnConfig() == BnConfig(
        **{f.name: getattr(SeqBnConfig(), f.name) for f in dataclasses.fields(BnConfig) if f.name != "extra"}
    )
    assert SeqBnConfig() != DoubleSeqBnConfig()
    assert LoRAConfig() != PrefixTuningConfig()
    assert len({SeqBnConfig(), SeqBnConfig(), PfeifferConfig(), LoRAConfig(), MAMConfig(), MAMConfig()}) == 3
    assert SeqBnConfig() != SEQ_BN_DICT  # a dict is not a config


# ---------------------------------------------------------------------------------------------------
# dicts and the real AdapterHub files
# ---------------------------------------------------------------------------------------------------

ALL_CONFIGS = [
    SeqBnConfig(),
    DoubleSeqBnConfig(),
    ParBnConfig(),
    CompacterConfig(),
    CompacterPlusPlusConfig(),
    BnConfig(
        mh_adapter=True, output_adapter=False, reduction_factor={"0": 2, "default": 4}, non_linearity="tanh"
    ),
    SeqBnConfig(leave_out=[0, 3], residual_before_ln="post_add", init_weights_seed=7),
    PrefixTuningConfig(),
    PrefixTuningConfig(flat=True, prefix_length=4),
    LoRAConfig(),
    LoRAConfig(r=16, alpha=32, attn_matrices=["q", "k", "v", "o"], intermediate_lora=True, dtype="float16"),
    IA3Config(),
    MAMConfig(),
    AdapterConfigBase.load("prefix_tuning|lora|seq_bn"),
]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: method_name(c))
def test_round_trip(config: AdapterConfigBase) -> None:
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data  # JSON-serialisable as is
    back = AdapterConfigBase.from_dict(data)
    assert back == config
    assert back.to_dict() == data
    assert method_name(back) == method_name(config)
    assert type(AdapterConfigBase.load(data)) is type(back)


def test_from_dict_dispatch() -> None:
    assert type(AdapterConfigBase.from_dict(SEQ_BN_DICT)) is SeqBnConfig
    assert (
        type(AdapterConfigBase.from_dict({**SEQ_BN_DICT, "mh_adapter": True, "output_adapter": False}))
        is BnConfig
    )
    assert type(AdapterConfigBase.from_dict({**SEQ_BN_DICT, "architecture": "bottleneck"})) is SeqBnConfig
    assert type(AdapterConfigBase.from_dict(LORA_DICT)) is LoRAConfig
    assert type(AdapterConfigBase.from_dict(IA3Config().to_dict())) is IA3Config
    assert type(AdapterConfigBase.from_dict(PREFIX_DICT)) is PrefixTuningConfig
    assert type(AdapterConfigBase.from_dict(MAMConfig().to_dict())) is ConfigUnion
    # partial dicts: missing keys take the defaults of the class from_dict is called on
    assert LoRAConfig.from_dict({"r": 4}) == LoRAConfig(r=4)
    assert SeqBnConfig.from_dict({"reduction_factor": 4}) == SeqBnConfig(reduction_factor=4)
    assert AdapterConfigBase.from_dict({"architecture": "lora", "composition_mode": "scale"}) == IA3Config()


def test_from_dict_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus'\]"):
        AdapterConfigBase.from_dict({**LORA_DICT, "bogus": 1})
    with pytest.raises(ValueError, match="unsupported adapter architecture 'reft'"):
        AdapterConfigBase.from_dict({"architecture": "reft"})
    with pytest.raises(
        ValueError, match=r"missing required key\(s\) \['non_linearity', 'reduction_factor'\]"
    ):
        AdapterConfigBase.from_dict({"mh_adapter": True, "output_adapter": True})
    with pytest.raises(ValueError, match="'configs' list"):
        AdapterConfigBase.from_dict({"architecture": "union"})
    with pytest.raises(ValueError, match="JSON object"):
        AdapterConfigBase.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="architecture 'lora'"):
        PrefixTuningConfig.from_dict(LORA_DICT)
    with pytest.raises(ValueError, match="r must be int"):
        AdapterConfigBase.from_dict({**LORA_DICT, "r": "8"})


def test_foreign_keys_kept_when_not_strict() -> None:
    data = {**SEQ_BN_DICT, "future_option": {"a": [1, 2]}, "other": 3}
    with pytest.warns(UserWarning, match=r"\['future_option', 'other'\]"):
        config = AdapterConfigBase.from_dict(data, strict=False)
    assert config.extra == {"future_option": {"a": (1, 2)}, "other": 3}
    assert config.to_dict() == data
    assert config == SeqBnConfig()  # extras do not take part in equality
    assert "future_option" not in repr(config)
    union_data = {"architecture": "union", "configs": [{**LORA_DICT, "x": 1}], "note": "hi"}
    with pytest.warns(UserWarning):
        union = AdapterConfigBase.from_dict(union_data, strict=False)
    assert union.to_dict() == union_data
    assert config.replace(dropout=0.1).extra == config.extra


@pytest.mark.parametrize("path", REFERENCE_FILES, ids=lambda p: "/".join(p.parts[-4:-2]))
def test_adapterhub_reference_files_round_trip_exactly(path: Path) -> None:
    data = json.loads(path.read_text())["config"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # AdapterHub's own files have no unknown keys
        config = AdapterConfigBase.from_dict(data)
    assert config.to_dict() == data
    assert AdapterConfigBase.from_dict(config.to_dict()) == config
    assert method_name(config) in {
        "seq_bn",
        "double_seq_bn",
        "par_bn",
        "compacter++",
        "lora",
        "ia3",
        "prefix_tuning",
        "mam",
        "seq_bn_inv",
    }


def test_reference_files_present() -> None:
    assert len(REFERENCE_FILES) == 25, f"expected 9 MiniLM + 16 decoder adapter configs under {SHARED}"


def test_reference_files_match_their_config_strings() -> None:
    readme_strings = {
        "seq_bn": "seq_bn",
        "double_seq_bn": "double_seq_bn",
        "par_bn": "par_bn[reduction_factor=8]",
        "compacter_pp": "compacter++",
        "lora": "lora",
        "ia3": "ia3",
        "prefix_tuning": "prefix_tuning[bottleneck_size=64,prefix_length=10]",
        "mam": "prefix_tuning[bottleneck_size=64,prefix_length=8]|par_bn[reduction_factor=8]",
        "seq_bn_inv": "seq_bn_inv",
    }
    for folder, spec in readme_strings.items():
        path = SHARED / "reference" / folder / "adapter_safetensors/adapter_config.json"
        if not path.exists():
            pytest.skip(f"{path} missing")
        assert AdapterConfigBase.load(spec).to_dict() == json.loads(path.read_text())["config"], folder


def test_an_inv_adapter_kind_is_accepted_once_a_room_registers_it() -> None:
    """The hook a room that builds invertible adapters uses; unregistered kinds stay refused."""
    with pytest.raises(ValueError, match="invertible adapters is not supported"):
        SeqBnConfig(inv_adapter="test_kind")
    bn_config.register_inv_adapters("test_kind")
    try:
        assert SeqBnConfig(inv_adapter="test_kind").inv_adapter == "test_kind"
        with pytest.raises(ValueError, match="inv_adapter='realnvp'"):
            SeqBnConfig(inv_adapter="realnvp")
    finally:
        bn_config._INV_ADAPTERS.discard("test_kind")


def test_configs_survive_copy_deepcopy_and_pickle() -> None:
    """A config holds FrozenMaps (its extras, a per-layer reduction factor); it copies and pickles like any
    value (FrozenMap's slots and raising __setattr__ made copy.deepcopy and pickle fail)."""
    config = SeqBnConfig(reduction_factor={"default": 16, "1": 8})
    for clone in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone == config and clone.reduction_factor_for(1) == 8 and clone.extra == {}
