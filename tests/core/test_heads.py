"""Prediction heads on XAdapterModels: shapes and losses, AdapterHub key names and head files,
per-split heads under BatchSplit and Parallel, decoder last-token pooling, mean_pool, training."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    RobertaConfig,
    XLMRobertaConfig,
)

from adapters_core import AdapterSetup, BatchSplit, Parallel
from adapters_core.heads import (
    AdapterModel,
    AutoAdapterModel,
    MultiHeadOutput,
    head_summary,
    mean_pool,
)

V = 99  # vocabulary of the tiny models
B, L = 4, 7


def bert_config(**kw: Any) -> BertConfig:
    return BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=64, **kw)


def gpt2_config(**kw: Any) -> GPT2Config:
    return GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                      bos_token_id=1, eos_token_id=2, **kw)


def llama_config(**kw: Any) -> LlamaConfig:
    return LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
                       bos_token_id=1, eos_token_id=2, **kw)


CONFIGS = {"bert": bert_config, "gpt2": gpt2_config, "llama": llama_config}


def make(kind: str, **kw: Any) -> AdapterModel:
    torch.manual_seed(0)
    return AutoAdapterModel.from_config(CONFIGS[kind](**kw)).eval()


def batch(seed: int = 1, lengths: tuple[int, ...] = (7, 5, 7, 3), left: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (len(lengths), L), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        if left:
            mask[i, L - n:] = 1
        else:
            mask[i, :n] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


def perturb(model: AdapterModel, *names: str, seed: int = 3) -> None:
    """Give adapters non-trivial weights (LoRA's B and par_bn's up start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for p in model.adapter_parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(autouse=True)
def _no_leftover_context() -> Iterator[None]:
    yield
    assert AdapterSetup.get_context() is None


# ---------------------------------------------------------------------------------------------------
# classes
# ---------------------------------------------------------------------------------------------------

FAMILIES = [
    (bert_config(), "BertAdapterModel", "bert"),
    (RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                   intermediate_size=37, max_position_embeddings=66), "RobertaAdapterModel", "roberta"),
    (XLMRobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=66), "XLMRobertaAdapterModel", "roberta"),
    (gpt2_config(), "GPT2AdapterModel", "transformer"),
    (llama_config(), "LlamaAdapterModel", "model"),
    (MistralConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=37, bos_token_id=1, eos_token_id=2), "MistralAdapterModel", "model"),
    (Qwen2Config(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=37, bos_token_id=1, eos_token_id=2), "Qwen2AdapterModel", "model"),
]


@pytest.mark.parametrize(("config", "cls_name", "prefix"), FAMILIES, ids=[f[1] for f in FAMILIES])
def test_auto_adapter_model_picks_class(config: Any, cls_name: str, prefix: str) -> None:
    model = AutoAdapterModel.from_config(config).eval()
    assert type(model).__name__ == cls_name
    assert model.base_model_prefix == prefix
    model.add_adapter("a", "lora")
    model.add_classification_head("a", num_labels=3)
    out = model(**batch(), head="a")
    assert out.logits.shape == (B, 3)


def test_from_pretrained_and_wrong_family(tmp_path: Path) -> None:
    torch.manual_seed(0)
    BertModel(bert_config()).save_pretrained(tmp_path)
    model = AutoAdapterModel.from_pretrained(tmp_path)
    assert type(model).__name__ == "BertAdapterModel"
    from adapters_core.heads import GPT2AdapterModel

    with pytest.raises(ValueError, match="takes model types"):
        GPT2AdapterModel(bert_config())


# ---------------------------------------------------------------------------------------------------
# head types: shapes and losses
# ---------------------------------------------------------------------------------------------------


def test_classification_single_multilabel_regression() -> None:
    model = make("bert")
    inputs = batch()
    model.add_classification_head("single", num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})
    labels = torch.tensor([0, 2, 1, 2])
    out = model(**inputs, head="single", labels=labels)
    assert out.logits.shape == (B, 3)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))
    assert model.get_labels("single") == ["neg", "neu", "pos"]

    model.add_classification_head("multi", num_labels=4, multilabel=True)
    targets = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 1, 0, 1]])
    out = model(**inputs, head="multi", labels=targets)
    assert out.logits.shape == (B, 4)
    assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(out.logits, targets.float()))
    assert model.heads["multi"].config["head_type"] == "multilabel_classification"

    model.add_classification_head("reg", num_labels=1)
    y = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = model(**inputs, head="reg", labels=y)
    assert out.logits.shape == (B, 1)
    assert torch.allclose(out.loss, F.mse_loss(out.logits.view(-1), y))

    model.add_classification_head("reg2", num_labels=2, problem_type="regression")
    y2 = torch.randn(B, 2)
    out = model(**inputs, head="reg2", labels=y2)
    assert torch.allclose(out.loss, F.mse_loss(out.logits, y2))
    assert model.heads["reg2"].config["problem_type"] == "regression"

    model.add_classification_head("pt", num_labels=2, problem_type="multi_label_classification")
    assert model.heads["pt"].config["head_type"] == "multilabel_classification"


def test_encoder_classification_pools_first_token() -> None:
    model = make("bert")
    model.add_classification_head("c", num_labels=2)
    inputs = batch()
    hidden = model.base_model(**inputs).last_hidden_state
    out = model(**inputs)
    assert torch.allclose(out.logits, model.heads["c"].mlp(hidden[:, 0]), atol=1e-6)
    model.add_classification_head("p", num_labels=2, use_pooler=True)
    pooled = model.base_model(**inputs).pooler_output
    assert torch.allclose(model(**inputs, head="p").logits, model.heads["p"].mlp(pooled), atol=1e-6)


def test_tagging_multiple_choice_qa() -> None:
    model = make("bert")
    inputs = batch()
    model.add_tagging_head("tag", num_labels=5)
    tags = torch.randint(0, 5, (B, L))
    out = model(**inputs, head="tag", labels=tags)
    assert out.logits.shape == (B, L, 5)
    active = inputs["attention_mask"].view(-1) == 1
    expected = F.cross_entropy(out.logits.view(-1, 5)[active], tags.view(-1)[active])
    assert torch.allclose(out.loss, expected)

    model.add_multiple_choice_head("mc", num_choices=3)
    ids = torch.randint(3, V, (2, 3, L))
    choice = torch.tensor([2, 0])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), head="mc", labels=choice)
    assert out.logits.shape == (2, 3)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, choice))

    model.add_qa_head("qa")
    start, end = torch.tensor([1, 2, 0, 3]), torch.tensor([3, 4, 0, 50])  # 50: outside -> ignored
    out = model(**inputs, head="qa", start_positions=start, end_positions=end)
    assert out.start_logits.shape == out.end_logits.shape == (B, L)
    end_loss = F.cross_entropy(out.end_logits[:3], end[:3])
    assert torch.allclose(out.loss, (F.cross_entropy(out.start_logits, start) + end_loss) / 2)
    assert torch.equal(end, torch.tensor([3, 4, 0, 50]))  # the caller's tensor is not clamped in place


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lm_head_tied_and_loss(kind: str) -> None:
    model = make(kind, tie_word_embeddings=True)
    emb = model.base_model.get_input_embeddings().weight
    model.add_causal_lm_head("lm", layers=1, bias=False)
    head = model.heads["lm"]
    assert head.output_embeddings.weight is emb
    inputs = batch(lengths=(7, 7, 7, 7))
    hidden = model.base_model(**inputs).last_hidden_state
    out = model(**inputs, head="lm", labels=inputs["input_ids"])
    assert out.logits.shape == (B, L, V)
    assert torch.allclose(out.logits, hidden @ emb.T, atol=1e-5)  # = the pretrained LM head
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), inputs["input_ids"][:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected)


def test_causal_lm_untied_llama_and_default_layout() -> None:
    model = make("llama")  # LlamaConfig ties nothing by default
    model.add_causal_lm_head("lm")
    assert model.heads["lm"].output_embeddings.weight is not model.base_model.get_input_embeddings().weight
    gpt2 = make("gpt2")
    gpt2.add_causal_lm_head("lm")  # AdapterHub's defaults: Linear, gelu, LayerNorm, tied projection
    keys = sorted(k for k in gpt2.state_dict() if k.startswith("heads."))
    assert keys == ["heads.lm.0.bias", "heads.lm.0.weight", "heads.lm.2.bias", "heads.lm.2.weight",
                    "heads.lm.3.bias", "heads.lm.3.weight"]
    assert gpt2.heads["lm"][3].weight is gpt2.base_model.get_input_embeddings().weight


# ---------------------------------------------------------------------------------------------------
# AdapterHub names and head files
# ---------------------------------------------------------------------------------------------------


def _head_keys(model: AdapterModel, name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(f"heads.{name}.")}


def test_key_names_match_adapterhub() -> None:
    model = make("bert")
    model.add_classification_head("cls", num_labels=3)
    assert _head_keys(model, "cls") == {
        "heads.cls.1.weight": (32, 32), "heads.cls.1.bias": (32,),
        "heads.cls.4.weight": (3, 32), "heads.cls.4.bias": (3,),
    }
    model.add_classification_head("noact", num_labels=2, activation_function=None)
    assert set(_head_keys(model, "noact")) == {"heads.noact.1.weight", "heads.noact.1.bias",
                                                "heads.noact.3.weight", "heads.noact.3.bias"}
    model.add_tagging_head("tag", num_labels=5)
    assert _head_keys(model, "tag") == {"heads.tag.1.weight": (5, 32), "heads.tag.1.bias": (5,)}
    model.add_multiple_choice_head("mc", num_choices=4)
    assert _head_keys(model, "mc")["heads.mc.4.weight"] == (1, 32)
    model.add_qa_head("qa")
    assert _head_keys(model, "qa") == {"heads.qa.1.weight": (2, 32), "heads.qa.1.bias": (2,)}


def test_head_config_json_contents(tmp_path: Path) -> None:
    model = make("bert")
    model.add_adapter("sst", "seq_bn")
    model.add_classification_head("sst", num_labels=2, id2label={0: "negative", 1: "positive"})
    model.save_adapter(tmp_path, "sst")
    meta = json.loads((tmp_path / "head_config.json").read_text())
    assert set(meta) == {"config", "hidden_size", "model_type", "model_name", "model_class", "name", "version"}
    assert meta["config"] == {
        "head_type": "classification", "num_labels": 2, "layers": 2, "activation_function": "tanh",
        "label2id": {"negative": 0, "positive": 1}, "use_pooler": False, "bias": True, "dropout_prob": None,
    }
    assert (meta["hidden_size"], meta["model_type"], meta["model_class"], meta["name"]) == (
        32, "bert", "BertAdapterModel", "sst")
    assert sorted(load_file(str(tmp_path / "model_head.safetensors"))) == [
        "heads.sst.1.bias", "heads.sst.1.weight", "heads.sst.4.bias", "heads.sst.4.weight"]
    assert head_summary(meta) == {"head_type": "classification", "num_labels": 2,
                                  "id2label": {0: "negative", 1: "positive"}}


def test_head_and_adapter_files_name_the_backbone_without_a_path_of_the_saving_machine(tmp_path: Path) -> None:
    """A backbone loaded from a local folder has an absolute _name_or_path; head_config.json, like
    adapter_config.json, names only the folder."""
    folder = tmp_path / "home" / "alice" / "tiny-bert"
    torch.manual_seed(0)
    BertModel(bert_config()).save_pretrained(folder)
    model = AutoAdapterModel.from_pretrained(folder)
    assert model.config._name_or_path == str(folder)
    model.add_adapter("sst", "seq_bn")
    model.add_classification_head("sst", num_labels=2)
    model.save_adapter(tmp_path / "saved", "sst")
    for name in ("adapter_config.json", "head_config.json"):
        text = (tmp_path / "saved" / name).read_text()
        assert json.loads(text)["model_name"] == "tiny-bert", name
        assert str(tmp_path) not in text, name


@pytest.mark.parametrize(("kind", "method"), [("bert", "seq_bn"), ("gpt2", "lora"), ("llama", "seq_bn")])
def test_save_load_roundtrip_identical_logits(tmp_path: Path, kind: str, method: str) -> None:
    model = make(kind)
    model.add_adapter("a", method)
    perturb(model, "a")
    model.add_classification_head("a", num_labels=3, id2label={0: "x", 1: "y", 2: "z"})
    inputs = batch()
    with AdapterSetup("a"):
        before = model(**inputs).logits
    model.save_adapter(tmp_path, "a")

    fresh = make(kind)  # same seed: the same backbone
    name = fresh.load_adapter(tmp_path, load_as="b")
    assert name == "b" and "b" in fresh.heads and fresh.heads["b"].id2label == {0: "x", 1: "y", 2: "z"}
    with AdapterSetup("b"):
        after = fresh(**inputs).logits
    assert torch.equal(before, after)
    fresh.delete_adapter("b")  # a head loaded with an adapter leaves with it
    assert "b" not in fresh.heads
    info = fresh.inspect_adapter_dir(tmp_path)
    assert info.has_head and len(fresh.heads) == 0 and not fresh.adapters_config


def test_tied_lm_head_file_omits_backbone_weight(tmp_path: Path) -> None:
    model = make("gpt2")
    model.add_adapter("a", "lora")
    perturb(model, "a")
    model.add_causal_lm_head("a")
    model.save_adapter(tmp_path, "a")
    keys = sorted(load_file(str(tmp_path / "model_head.safetensors")))
    assert keys == ["heads.a.0.bias", "heads.a.0.weight", "heads.a.2.bias", "heads.a.2.weight", "heads.a.3.bias"]
    fresh = make("gpt2")
    fresh.load_adapter(tmp_path)
    assert fresh.heads["a"][3].weight is fresh.base_model.get_input_embeddings().weight
    inputs = batch()
    with AdapterSetup("a"):
        assert torch.equal(model(**inputs).logits, fresh(**inputs).logits)

    # AdapterHub writes the tied weight too: equal to our embeddings -> stays tied
    state = load_file(str(tmp_path / "model_head.safetensors"))
    state["heads.a.3.weight"] = model.base_model.get_input_embeddings().weight.detach().clone()
    save_file(state, str(tmp_path / "model_head.safetensors"))
    other = make("gpt2")
    other.load_adapter(tmp_path, load_as="c")
    assert other.heads["c"][3].weight is other.base_model.get_input_embeddings().weight


def test_load_adapterhub_head_file_and_bad_files(tmp_path: Path) -> None:
    model = make("bert")
    model.add_adapter("a", "seq_bn")
    model.save_adapter(tmp_path, "a", with_head=False)
    hub_config = {  # as AdapterHub writes it
        "config": {"head_type": "tagging", "num_labels": 3, "layers": 1, "activation_function": "tanh",
                   "label2id": {"O": 0, "B-PER": 1, "I-PER": 2}, "dropout_prob": None},
        "hidden_size": 32, "model_type": "bert", "model_name": "bert-base-uncased",
        "model_class": "BertAdapterModel", "name": "ner", "version": "adapters.1.2.0",
    }
    (tmp_path / "head_config.json").write_text(json.dumps(hub_config))
    weight, bias = torch.randn(3, 32), torch.randn(3)
    save_file({"heads.ner.1.weight": weight, "heads.ner.1.bias": bias}, str(tmp_path / "model_head.safetensors"))
    fresh = make("bert")
    fresh.load_adapter(tmp_path)
    assert torch.equal(fresh.heads["a"][1].weight, weight)
    assert fresh.get_labels("a") == ["O", "B-PER", "I-PER"]

    save_file({"heads.ner.1.weight": torch.randn(4, 32), "heads.ner.1.bias": bias},
              str(tmp_path / "model_head.safetensors"))
    other = make("bert")
    with pytest.raises(ValueError, match=r"wrong shape for heads\.a\.1\.weight"):
        other.load_adapter(tmp_path)
    assert not other.has_adapter("a") and "a" not in other.heads
    save_file({"heads.ner.1.weight": weight}, str(tmp_path / "model_head.safetensors"))
    with pytest.raises(ValueError, match=r"missing key heads\.a\.1\.bias"):
        other.load_adapter(tmp_path)


# ---------------------------------------------------------------------------------------------------
# heads under BatchSplit and Parallel
# ---------------------------------------------------------------------------------------------------


def _three_adapters(kind: str) -> AdapterModel:
    model = make(kind)
    model.add_adapter("a", "seq_bn")
    model.add_adapter("b", "lora")
    model.add_adapter("c", "par_bn")  # no head: its rows get the backbone output
    perturb(model, "a", "b", "c")
    model.add_classification_head("a", num_labels=3)
    model.add_tagging_head("b", num_labels=4)
    return model


def _rows(inputs: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in inputs.items()}


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_batchsplit_heads_match_each_split_alone(kind: str) -> None:
    model = _three_adapters(kind)
    inputs = batch(lengths=(7, 5, 6, 4, 7, 3))
    setup = BatchSplit("a", "b", "c", None, batch_sizes=[2, 1, 2, 1])
    with AdapterSetup(setup):
        out = model(**inputs)
    assert isinstance(out, MultiHeadOutput) and len(out) == 4
    with AdapterSetup("a"):
        alone_a = model(**_rows(inputs, 0, 2))
    with AdapterSetup("b"):
        alone_b = model(**_rows(inputs, 2, 3))
    with AdapterSetup("c"):
        alone_c = model(**_rows(inputs, 3, 5))
    alone_none = model.base_model(**_rows(inputs, 5, 6))
    assert out[0].logits.shape == (2, 3) and out[1].logits.shape == (1, L, 4)
    assert torch.allclose(out[0].logits, alone_a.logits, atol=1e-5)
    assert torch.allclose(out[1].logits, alone_b.logits, atol=1e-5)
    assert torch.allclose(out[2].last_hidden_state, alone_c.last_hidden_state, atol=1e-5)
    assert torch.allclose(out[3].last_hidden_state, alone_none.last_hidden_state, atol=1e-5)
    assert not torch.allclose(out[2].last_hidden_state, model.base_model(**_rows(inputs, 3, 5)).last_hidden_state,
                              atol=1e-3)  # the adapters matter


def test_batchsplit_heads_with_labels_and_nesting() -> None:
    model = _three_adapters("bert")
    model.add_classification_head("a2", num_labels=3)
    inputs = batch()
    labels = torch.tensor([0, 1, 2, 1])
    with AdapterSetup(BatchSplit("a", "a", batch_sizes=[1, 3]), head_setup=BatchSplit("a", "a2", batch_sizes=[1, 3])):
        out = model(**inputs, labels=labels)
    assert torch.allclose(out.loss, F.cross_entropy(out[0].logits, labels[:1]) + F.cross_entropy(out[1].logits, labels[1:]))
    assert out.logits.shape == (B, 3)
    nested = BatchSplit(BatchSplit("a", "c", batch_sizes=[1, 1]), "a", batch_sizes=[2, 2])
    with AdapterSetup(nested):
        out = model(**inputs)
    assert isinstance(out[0], MultiHeadOutput) and out[0][0].logits.shape == (1, 3)
    assert out[0][1].last_hidden_state.shape == (1, L, 32) and out[1].logits.shape == (2, 3)
    with pytest.raises(AttributeError, match="not every head output"):
        _ = out.logits


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_parallel_heads_match_each_child_alone(kind: str) -> None:
    model = _three_adapters(kind)
    inputs = batch()
    with AdapterSetup(Parallel("a", "b")):
        out = model(**inputs)
    with AdapterSetup("a"):
        alone_a = model(**inputs)
    with AdapterSetup("b"):
        alone_b = model(**inputs)
    assert len(out) == 2
    assert torch.allclose(out[0].logits, alone_a.logits, atol=1e-5)
    assert torch.allclose(out[1].logits, alone_b.logits, atol=1e-5)
    model.set_active_adapters(Parallel("a", "b"))  # statically: the same heads are implied
    assert model.active_head == Parallel("a", "b")
    static = model(**inputs)
    assert torch.allclose(static[0].logits, out[0].logits) and torch.allclose(static[1].logits, out[1].logits)
    labels = torch.tensor([0, 1, 2, 1])
    with AdapterSetup(Parallel("a", "a")):
        out = model(**inputs, labels=labels)
    assert torch.allclose(out.loss, 2 * F.cross_entropy(alone_a.logits, labels), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# decoder pooling, mean_pool
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_decoder_classification_uses_last_real_token(kind: str, left: bool) -> None:
    model = make(kind)
    model.add_classification_head("cls", num_labels=2)
    lengths = (7, 4, 2, 5)
    inputs = batch(lengths=lengths, left=left)
    hidden = model.base_model(**inputs).last_hidden_state
    last = [L - 1 if left else n - 1 for n in lengths]
    expected = model.heads["cls"].mlp(hidden[torch.arange(B), torch.tensor(last)])
    out = model(**inputs)
    assert torch.allclose(out.logits, expected, atol=1e-6)
    if not left:  # causal attention: the padded row's logits equal the unpadded run's
        alone = model(input_ids=inputs["input_ids"][1:2, :4], attention_mask=inputs["attention_mask"][1:2, :4])
        assert torch.allclose(out.logits[1:2], alone.logits, atol=1e-5)


def test_decoder_pooling_from_pad_token_without_mask() -> None:
    model = make("gpt2", pad_token_id=0)
    model.add_classification_head("cls", num_labels=2)
    inputs = batch(lengths=(7, 4, 2, 5))  # padded with id 0
    hidden = model.base_model(**inputs).last_hidden_state
    expected = model.heads["cls"].mlp(hidden[torch.arange(B), torch.tensor([6, 3, 1, 4])])
    assert torch.allclose(model(input_ids=inputs["input_ids"]).logits, expected, atol=1e-5)


def test_mean_pool_masks_padding_and_normalises() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    pooled = mean_pool(hidden, mask)
    manual = hidden[0, :3].mean(0)
    assert torch.allclose(pooled[0], manual / manual.norm(), atol=1e-6)
    assert torch.allclose(pooled[:2].norm(dim=-1), torch.ones(2), atol=1e-6)
    assert torch.equal(pooled[2], torch.zeros(8))  # no real token: zeros, not NaN
    changed = hidden.clone()
    changed[0, 3:] = 100.0
    assert torch.allclose(mean_pool(changed, mask)[0], pooled[0])
    assert torch.allclose(mean_pool(torch.cat([hidden, hidden]), mask), torch.cat([pooled, pooled]))


def test_embed_for_adapter_without_head() -> None:
    model = _three_adapters("bert")
    inputs = batch()
    with AdapterSetup("c"):
        emb = model.embed(**inputs)
        out = model(**inputs)  # no head for "c": the backbone output
    assert emb.shape == (B, 32)
    assert torch.allclose(emb, mean_pool(out.last_hidden_state, inputs["attention_mask"]))
    with AdapterSetup(Parallel("a", "c")):
        both = model.embed(**inputs)
    assert both.shape == (2 * B, 32) and torch.allclose(both[B:], emb, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# training, management
# ---------------------------------------------------------------------------------------------------


def _train(model: AdapterModel, steps: int, **batch_kw: Any) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = model(**batch_kw).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_train_adapter_trains_head_and_freezes_backbone(kind: str) -> None:
    model = make(kind)
    model.add_adapter("a", "seq_bn")
    model.add_classification_head("a", num_labels=2)
    model.add_adapter("other", "lora")
    model.add_classification_head("other", num_labels=2)
    if kind == "gpt2":
        model.add_causal_lm_head("lm")  # tied: must not unfreeze the embeddings
    backbone = {k: v.clone() for k, v in model.base_model.state_dict().items() if ".adapters." not in k}
    head_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    model.train_adapter("a")
    if kind == "gpt2":
        from adapters_core.heads import unfreeze_head

        unfreeze_head(model, "lm")
        assert not model.heads["lm"][3].weight.requires_grad and model.heads["lm"][0].weight.requires_grad
    assert model.active_head == "a"
    inputs = batch()
    _train(model, 3, **inputs, labels=torch.tensor([0, 1, 1, 0]))
    after = model.base_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in backbone.items())
    heads_after = model.heads.state_dict()
    assert not torch.equal(head_before["a.4.weight"], heads_after["a.4.weight"])
    assert torch.equal(head_before["other.4.weight"], heads_after["other.4.weight"])


def test_head_management() -> None:
    model = _three_adapters("bert")
    with pytest.raises(ValueError, match="already exists"):
        model.add_classification_head("a")
    model.add_classification_head("a", num_labels=5, overwrite_ok=True)
    assert model.heads["a"][4].out_features == 5
    with pytest.raises(ValueError, match="no head named"):
        model.set_active_heads("nope")
    with pytest.raises(ValueError, match="no head named"):
        model(**batch(), head="c")  # an explicit head must exist
    with pytest.raises(ValueError, match="no head named"), AdapterSetup("a", head_setup="typo"):
        model(**batch())
    model.set_active_heads("b")
    model.delete_head("b")
    assert model.active_head is None and "b" not in model.heads
    out = model(**batch())  # nothing active: the backbone output
    assert out.last_hidden_state.shape == (B, L, 32)
    assert isinstance(model(**batch(), head="a", return_dict=False), tuple)
    with pytest.raises(ValueError, match="id2label"):
        model.add_classification_head("bad", num_labels=2, id2label={0: "x"})
