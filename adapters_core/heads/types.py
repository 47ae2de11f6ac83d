"""Prediction head modules, laid out like AdapterHub's so that `heads.<name>.<i>.*` keys and
head_config.json contents interoperate with their files.

A head is an `nn.Sequential` of numbered modules. Classification-style heads repeat
[Dropout, Linear(h, h), activation] and end in [Dropout, Linear(h, out)], so with the defaults
(layers=2, tanh) the weights are `1.weight` and `4.weight`. The causal LM head has no dropout:
[Linear, activation, LayerNorm] * (layers - 1) followed by the vocabulary projection.
Heads never pool by themselves: the model hands them a `HeadInput` with the pooled token
(first token for encoders, last real token for decoders) already picked.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import get_activation
from transformers.modeling_outputs import (
    CausalLMOutputWithPast,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    Seq2SeqLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import ModelOutput

__all__ = [
    "HEAD_TYPES", "CausalLMHead", "ClassificationHead", "HeadInput", "MultiHeadOutput",
    "MultiLabelClassificationHead", "MultipleChoiceHead", "PredictionHead", "QuestionAnsweringHead",
    "TaggingHead", "build_head", "mean_pool",
]

_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens (attention_mask == 1), L2-normalised, in float32: [batch, hidden].

    A mask with fewer rows than the hidden states (a Parallel setup replicated the batch k times)
    is repeated to match. Rows without any real token give a zero vector.
    """
    hidden = last_hidden_state.float()
    if attention_mask is None:
        mask = hidden.new_ones(hidden.shape[:2])
    else:
        mask = attention_mask.to(hidden.device, torch.float32)
        if mask.shape[0] != hidden.shape[0]:
            if hidden.shape[0] % mask.shape[0]:
                raise ValueError(f"attention_mask has {mask.shape[0]} rows, hidden states {hidden.shape[0]}")
            mask = mask.repeat(hidden.shape[0] // mask.shape[0], 1)
    summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)
    pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


@dataclass
class MultiHeadOutput(ModelOutput):
    """Outputs of several heads (BatchSplit: one per split; Parallel: one per copy), list-like.

    `out[i]` / iteration / `len(out)` address the per-head outputs; `out.loss` sums the heads' losses.
    """

    head_outputs: list[ModelOutput] | None = None
    loss: torch.FloatTensor | None = None

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, int):
            return self.head_outputs[k]
        return super().__getitem__(k)

    def __iter__(self) -> Any:
        return iter(self.head_outputs or [])

    def __len__(self) -> int:
        return len(self.head_outputs or [])

    @property
    def logits(self) -> torch.Tensor:
        """The heads' logits concatenated along the batch (all heads must produce `logits`)."""
        parts = [o.logits if isinstance(o, MultiHeadOutput) else o.get("logits") for o in self]
        if any(p is None for p in parts):
            raise AttributeError("not every head output has logits (a split without a head?)")
        return torch.cat(parts, dim=0)


@dataclass
class HeadInput:
    """What a head reads for its rows: token states, the pooled token, the mask and the base output;
    `before_output` is what the method rooms do to an LM head's states before its output embeddings."""

    hidden: torch.Tensor
    cls: torch.Tensor | None
    pooled: torch.Tensor | None
    attention_mask: torch.Tensor | None
    base: ModelOutput
    before_output: Callable[[torch.Tensor], torch.Tensor] | None = None


class _Activation(nn.Module):
    """A parameter-free activation by name (AdapterHub's names: tanh, relu, gelu, swish, leakyrelu ...)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = F.leaky_relu if name.lower() == "leakyrelu" else get_activation(name.lower())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _dropout_prob(config: dict[str, Any], model_config: Any) -> float:
    for value in (config.get("dropout_prob"), getattr(model_config, "classifier_dropout", None),
                  getattr(model_config, "hidden_dropout_prob", None)):
        if value is not None:
            return float(value)
    return 0.0


def _label2id(id2label: dict[Any, str] | None, n: int | None) -> dict[str, int] | None:
    if id2label is None:
        return {f"LABEL_{i}": i for i in range(n)} if n is not None else None
    mapping = {str(label): int(i) for i, label in id2label.items()}
    if n is not None and sorted(mapping.values()) != list(range(n)):
        raise ValueError(f"id2label must map the ids 0..{n - 1} to distinct labels, got {id2label!r}")
    return mapping


def _aux(base: ModelOutput) -> dict[str, Any]:
    return {"hidden_states": base.get("hidden_states"), "attentions": base.get("attentions")}


class PredictionHead(nn.Sequential):
    """Base of all heads: `config` is exactly what head_config.json stores under "config"."""

    head_type: ClassVar[str] = ""
    #: config keys (besides head_type) this head takes, with their defaults, in AdapterHub's order.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, name: str, model_config: Any, config: dict[str, Any]):
        super().__init__()
        self.name = name
        self.config: dict[str, Any] = {"head_type": self.head_type, **config}
        self.build(model_config)
        _init_weights(self, float(getattr(model_config, "initializer_range", 0.02) or 0.02))

    # -- layout --------------------------------------------------------------------------------
    def _out_features(self, model_config: Any) -> int:
        return int(self.config["num_labels"])

    def build(self, model_config: Any) -> None:
        hidden = int(model_config.hidden_size)
        layers = int(self.config["layers"])
        if layers < 1:
            raise ValueError(f"a head needs layers >= 1, got {layers}")
        act = self.config.get("activation_function")
        modules: list[nn.Module] = []
        p = _dropout_prob(self.config, model_config)
        for i in range(layers):
            modules.append(nn.Dropout(p))
            if i < layers - 1:
                modules.append(nn.Linear(hidden, hidden))
                if act:
                    modules.append(_Activation(act))
            else:
                modules.append(nn.Linear(hidden, self._out_features(model_config), bias=self.config.get("bias", True)))
        for i, module in enumerate(modules):
            self.add_module(str(i), module)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        for module in self:
            x = module(x)
        return x

    # -- labels --------------------------------------------------------------------------------
    @property
    def label2id(self) -> dict[str, int] | None:
        return self.config.get("label2id")

    @property
    def id2label(self) -> dict[int, str] | None:
        mapping = self.label2id
        return None if mapping is None else {int(i): label for label, i in mapping.items()}

    @classmethod
    def from_config(cls, name: str, model_config: Any, config: dict[str, Any]) -> PredictionHead:
        """Rebuild a head from the "config" of a head_config.json (ours or AdapterHub's)."""
        config = dict(config)
        config.pop("head_type", None)
        id2label = config.pop("id2label", None)
        label2id = config.pop("label2id", None)
        if id2label is None and label2id is not None:
            id2label = {int(i): label for label, i in label2id.items()}
        unknown = sorted(set(config) - set(cls.defaults))
        if unknown:  # a foreign file: keep the keys (they are saved again) and say so
            warnings.warn(f"{cls.head_type} head {name!r}: unknown config key(s) kept: {', '.join(unknown)}",
                          stacklevel=2)
        kwargs = {**cls.defaults, **config}
        if "label2id" in cls.defaults:
            id2label = {int(i): label for i, label in id2label.items()} if id2label is not None else None
            kwargs["label2id"] = _label2id(id2label, kwargs.get("num_labels", kwargs.get("num_choices")))
        return cls(name, model_config, kwargs)

    def forward(self, inp: HeadInput, **targets: Any) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def _init_weights(head: nn.Module, std: float) -> None:
    """Normal(0, initializer_range) weights, zero biases, unit LayerNorms (as HF's _init_weights)."""
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


def _pooled_input(head: PredictionHead, inp: HeadInput) -> torch.Tensor:
    if head.config.get("use_pooler"):
        if inp.pooled is None:
            raise ValueError(f"head {head.name!r} has use_pooler=True but the backbone has no pooler output")
        return inp.pooled
    if inp.cls is None:
        raise ValueError(f"head {head.name!r} needs a pooled token, which this model does not provide")
    return inp.cls


_CLASSIFICATION_DEFAULTS: dict[str, Any] = {
    "num_labels": 2, "layers": 2, "activation_function": "tanh", "label2id": None,
    "use_pooler": False, "bias": True, "dropout_prob": None, "problem_type": None,
}


class ClassificationHead(PredictionHead):
    """Sequence classification or regression on the pooled token.

    Loss: MSE when num_labels == 1 or problem_type == "regression"; BCE-with-logits for
    problem_type "multi_label_classification"; otherwise cross-entropy.
    """

    head_type = "classification"
    defaults = _CLASSIFICATION_DEFAULTS

    def __init__(self, name: str, model_config: Any, config: dict[str, Any]):
        config = dict(config)
        if config.get("problem_type") is None:
            config.pop("problem_type", None)  # AdapterHub's files never carry the key
        elif config["problem_type"] not in _PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {_PROBLEM_TYPES}, got {config['problem_type']!r}")
        super().__init__(name, model_config, config)

    @property
    def problem_type(self) -> str:
        given = self.config.get("problem_type")
        if given:
            return given
        if self.head_type == "multilabel_classification":
            return "multi_label_classification"
        return "regression" if int(self.config["num_labels"]) == 1 else "single_label_classification"

    def forward(self, inp: HeadInput, labels: torch.Tensor | None = None, **_: Any) -> ModelOutput:
        logits = self.mlp(_pooled_input(self, inp))
        loss = None
        if labels is not None:
            problem = self.problem_type
            if problem == "regression":
                if logits.shape[-1] == 1:
                    loss = F.mse_loss(logits.view(-1), labels.view(-1).to(logits.dtype))
                else:
                    loss = F.mse_loss(logits, labels.to(logits.dtype))
            elif problem == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, **_aux(inp.base))


class MultiLabelClassificationHead(ClassificationHead):
    """Multi-label classification: independent sigmoid per label, BCE-with-logits loss."""

    head_type = "multilabel_classification"


class MultipleChoiceHead(PredictionHead):
    """One score per (example, choice) row; logits reshaped to [examples, num_choices]."""

    head_type = "multiple_choice"
    defaults = {
        "num_choices": 2, "layers": 2, "activation_function": "tanh", "label2id": None,
        "use_pooler": False, "dropout_prob": None,
    }

    def _out_features(self, model_config: Any) -> int:
        return 1

    def forward(self, inp: HeadInput, labels: torch.Tensor | None = None, **_: Any) -> ModelOutput:
        logits = self.mlp(_pooled_input(self, inp)).view(-1, int(self.config["num_choices"]))
        loss = F.cross_entropy(logits, labels.view(-1)) if labels is not None else None
        return MultipleChoiceModelOutput(loss=loss, logits=logits, **_aux(inp.base))


class TaggingHead(PredictionHead):
    """Token classification; the loss counts real tokens only (attention_mask == 1, labels != -100)."""

    head_type = "tagging"
    defaults = {"num_labels": 2, "layers": 1, "activation_function": "tanh", "label2id": None, "dropout_prob": None}

    def forward(self, inp: HeadInput, labels: torch.Tensor | None = None, **_: Any) -> ModelOutput:
        logits = self.mlp(inp.hidden)
        loss = None
        if labels is not None:
            if tuple(labels.shape) != tuple(logits.shape[:2]):
                raise ValueError(f"tagging labels must be [batch, seq] = {tuple(logits.shape[:2])}, "
                                 f"got {tuple(labels.shape)}")
            flat = labels.reshape(-1)
            if inp.attention_mask is not None:
                flat = torch.where(inp.attention_mask.reshape(-1) == 1, flat, torch.full_like(flat, -100))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=-100)
        return TokenClassifierOutput(loss=loss, logits=logits, **_aux(inp.base))


class QuestionAnsweringHead(PredictionHead):
    """Extractive QA: per-token start and end logits; loss = mean of the two cross-entropies."""

    head_type = "question_answering"
    defaults = TaggingHead.defaults

    def forward(
        self, inp: HeadInput, start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None, **_: Any,
    ) -> ModelOutput:
        logits = self.mlp(inp.hidden)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1)[:2])
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]  # positions outside the input are ignored, as in HF
            start = start_positions.reshape(-1).clamp(0, ignored)
            end = end_positions.reshape(-1).clamp(0, ignored)
            loss = (F.cross_entropy(start_logits, start, ignore_index=ignored)
                    + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2
        return QuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, **_aux(inp.base)
        )


class CausalLMHead(PredictionHead):
    """Next-token prediction over the vocabulary; the last Linear may share the input embeddings."""

    head_type = "causal_lm"
    defaults = {
        "vocab_size": None, "embedding_size": None, "layers": 1, "activation_function": None,
        "layer_norm": False, "bias": False, "shift_labels": True, "label2id": None, "dropout_prob": None,
    }

    def __init__(self, name: str, model_config: Any, config: dict[str, Any]):
        config = dict(config)
        config["vocab_size"] = int(config.get("vocab_size") or model_config.vocab_size)
        config["embedding_size"] = int(
            config.get("embedding_size") or getattr(model_config, "embedding_size", None) or model_config.hidden_size
        )
        super().__init__(name, model_config, config)

    def build(self, model_config: Any) -> None:
        hidden, emb = int(model_config.hidden_size), int(self.config["embedding_size"])
        act = self.config.get("activation_function")
        modules: list[nn.Module] = []
        for i in range(int(self.config["layers"]) - 1):
            modules.append(nn.Linear(hidden if i == 0 else emb, emb))
            if act:
                modules.append(_Activation(act))
            if self.config.get("layer_norm"):
                modules.append(nn.LayerNorm(emb, eps=float(getattr(model_config, "layer_norm_eps", 1e-12))))
        modules.append(nn.Linear(emb, int(self.config["vocab_size"]), bias=bool(self.config.get("bias"))))
        for i, module in enumerate(modules):
            self.add_module(str(i), module)

    @property
    def output_embeddings(self) -> nn.Linear:
        return self[len(self) - 1]

    @property
    def output_key(self) -> str:
        """State-dict key (inside the head) of the vocabulary projection's weight."""
        return f"{len(self) - 1}.weight"

    def forward(self, inp: HeadInput, labels: torch.Tensor | None = None, **_: Any) -> ModelOutput:
        x = inp.hidden
        for module in list(self)[:-1]:
            x = module(x)
        if inp.before_output is not None:
            x = inp.before_output(x)
        logits = self.output_embeddings(x)
        loss = None
        if labels is not None:
            scores, targets = logits, labels
            if self.config.get("shift_labels", True):
                scores, targets = logits[..., :-1, :], labels[..., 1:]
            loss = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=inp.base.get("past_key_values"), **_aux(inp.base)
        )


class Seq2SeqLMHead(CausalLMHead):
    """An encoder-decoder's LM head over the decoder states (AdapterHub's seq2seq_lm): labels are not shifted.

    T5 with tied embeddings scales the decoder output by d_model**-0.5 first, as T5ForConditionalGeneration
    and AdapterHub's T5AdapterModel do."""

    head_type = "seq2seq_lm"
    defaults = {**CausalLMHead.defaults, "shift_labels": False}

    def __init__(self, name: str, model_config: Any, config: dict[str, Any]):
        super().__init__(name, model_config, config)
        t5_tied = model_config.model_type in ("t5", "mt5") and getattr(model_config, "tie_word_embeddings", False)
        self.input_scale = float(model_config.d_model) ** -0.5 if t5_tied else 1.0

    def forward(self, inp: HeadInput, labels: torch.Tensor | None = None, **_: Any) -> ModelOutput:
        hidden = inp.hidden * self.input_scale if self.input_scale != 1.0 else inp.hidden
        logits = self.mlp(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        base = inp.base
        return Seq2SeqLMOutput(
            loss=loss, logits=logits, cache=base.get("cache"),
            decoder_hidden_states=base.get("decoder_hidden_states"), decoder_attentions=base.get("decoder_attentions"),
            cross_attentions=base.get("cross_attentions"), encoder_last_hidden_state=base.get("encoder_last_hidden_state"),
            encoder_hidden_states=base.get("encoder_hidden_states"), encoder_attentions=base.get("encoder_attentions"),
        )


_HEAD_CLASSES: dict[str, type[PredictionHead]] = {
    cls.head_type: cls
    for cls in (ClassificationHead, MultiLabelClassificationHead, TaggingHead, MultipleChoiceHead,
                QuestionAnsweringHead, CausalLMHead, Seq2SeqLMHead)
}
HEAD_TYPES: tuple[str, ...] = tuple(_HEAD_CLASSES)


def build_head(name: str, model_config: Any, config: dict[str, Any]) -> PredictionHead:
    """A head from a head config dict (with "head_type"); ValueError for unknown types or keys."""
    head_type = config.get("head_type")
    cls = _HEAD_CLASSES.get(str(head_type))
    if cls is None:
        raise ValueError(f"unsupported head type {head_type!r}; supported: {', '.join(HEAD_TYPES)}")
    return cls.from_config(name, model_config, config)
