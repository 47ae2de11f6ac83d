"""XAdapterModel classes: a backbone plus named prediction heads, and AutoAdapterModel.

`AdapterModel.forward` builds the ForwardContext itself, replicates the batch for Parallel, runs the
backbone (whose entry hook then reuses that context) and applies the heads the setup names:
a head name -> that head on every row; BatchSplit of heads -> each head on its rows; Parallel ->
head i on replicated copy i (or, without replication, every head on the whole batch). A split whose
head is None, or names an adapter without a head, gets the backbone output for its rows.
Encoders pool the first token for sequence-level heads; decoders (GPT-2, Llama, Mistral, Qwen2)
pool each row's last real token (attention_mask; left or right padding).
Head files (heads/files.py) use AdapterHub's names: head_config.json + model_head.safetensors, keys
heads.<name>.*.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from ..composition import BatchSplit, Parallel
from ..context import default_head_setup
from ..formats import AdapterFiles
from ..model import BATCH_KWARGS, AdapterModelMixin, _check_name, replicate_batch, wire
from ..routing import forward_context
from .files import head_files, load_head_files, unfreeze_head
from .routing import HeadRun, HeadSpec, flatten_choices, head_leaves
from .types import (
    CausalLMHead,
    ClassificationHead,
    MultiHeadOutput,
    MultiLabelClassificationHead,
    MultipleChoiceHead,
    PredictionHead,
    QuestionAnsweringHead,
    Seq2SeqLMHead,
    TaggingHead,
    build_head,
    mean_pool,
)

__all__ = [
    "AdapterModel", "AutoAdapterModel", "BartAdapterModel", "BertAdapterModel", "GPT2AdapterModel",
    "LlamaAdapterModel", "MBartAdapterModel", "MistralAdapterModel", "MT5AdapterModel", "Qwen2AdapterModel",
    "RobertaAdapterModel", "T5AdapterModel", "XLMRobertaAdapterModel", "adapter_model_class",
]

_DECODER_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2"})


class AdapterModel(AdapterModelMixin, nn.Module):
    """A base model (under its usual prefix, e.g. `bert`) with adapters and a dict of heads."""

    #: model types the class accepts (empty: any supported type).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: True: sequence heads read the last real token (decoders); None: decided by model_type.
    pool_last_token: ClassVar[bool | None] = None

    def __init__(self, base: PreTrainedModel | PretrainedConfig):
        super().__init__()
        if isinstance(base, PretrainedConfig):
            base = AutoModel.from_config(base)
        if self.model_types and base.config.model_type not in self.model_types:
            raise ValueError(
                f"{type(self).__name__} takes model types {self.model_types}, got {base.config.model_type!r}"
            )
        self.base_model_prefix = base.base_model_prefix
        self.add_module(base.base_model_prefix, base)
        self.config = base.config
        self.heads = nn.ModuleDict()
        self._active_head: HeadSpec = None
        self._owned_heads: set[str] = set()  # heads loaded with an adapter: deleted with it
        wire(self)

    @property
    def base_model(self) -> PreTrainedModel:
        return getattr(self, self.base_model_prefix)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> AdapterModel:
        return cls(AutoModel.from_pretrained(path, **kwargs))

    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs: Any) -> AdapterModel:
        return cls(AutoModel.from_config(config, **kwargs))

    @property
    def pools_last_token(self) -> bool:
        if self.pool_last_token is not None:
            return self.pool_last_token
        return self.config.model_type in _DECODER_TYPES

    # -- adding and removing heads -------------------------------------------------------------
    def _ties(self, head: PredictionHead) -> bool:
        """Whether a causal LM head's projection shares the input embeddings (HF's tie_word_embeddings)."""
        if not isinstance(head, CausalLMHead) or not getattr(self.config, "tie_word_embeddings", False):
            return False
        emb = self.base_model.get_input_embeddings()
        return emb is not None and tuple(emb.weight.shape) == tuple(head.output_embeddings.weight.shape)

    def _add_head(self, head: PredictionHead, overwrite_ok: bool, set_active: bool, tie: bool | None = None) -> None:
        _check_name(head.name)
        if head.name in self.heads and not overwrite_ok:
            raise ValueError(f"a head named {head.name!r} already exists (pass overwrite_ok=True to replace it)")
        ref = next(self.base_model.parameters())
        head.to(device=ref.device, dtype=ref.dtype)
        head.train(self.training)
        if tie is None:
            tie = self._ties(head)
        if tie:
            head.output_embeddings.weight = self.base_model.get_input_embeddings().weight
        self.heads[head.name] = head
        self._owned_heads.discard(head.name)
        if set_active:
            self.active_head = head.name

    def add_classification_head(
        self, head_name: str, num_labels: int = 2, layers: int = 2, activation_function: str | None = "tanh",
        overwrite_ok: bool = False, multilabel: bool = False, id2label: dict[int, str] | None = None,
        use_pooler: bool = False, *, problem_type: str | None = None, dropout_prob: float | None = None,
        bias: bool = True, set_active: bool = True,
    ) -> None:
        """Sequence classification (multilabel: BCE), or regression with num_labels=1 / problem_type."""
        if problem_type == "multi_label_classification":
            multilabel, problem_type = True, None
        elif multilabel and problem_type is not None:
            raise ValueError(f"multilabel=True conflicts with problem_type={problem_type!r}")
        cls = MultiLabelClassificationHead if multilabel else ClassificationHead
        config = {"num_labels": num_labels, "layers": layers, "activation_function": activation_function,
                  "id2label": id2label, "use_pooler": use_pooler, "bias": bias, "dropout_prob": dropout_prob,
                  "problem_type": problem_type}
        self._add_head(cls.from_config(head_name, self.config, config), overwrite_ok, set_active)

    def add_tagging_head(
        self, head_name: str, num_labels: int = 2, layers: int = 1, activation_function: str | None = "tanh",
        overwrite_ok: bool = False, id2label: dict[int, str] | None = None, *, set_active: bool = True,
    ) -> None:
        """Token classification (NER, POS, ...)."""
        config = {"num_labels": num_labels, "layers": layers, "activation_function": activation_function,
                  "id2label": id2label}
        self._add_head(TaggingHead.from_config(head_name, self.config, config), overwrite_ok, set_active)

    def add_multiple_choice_head(
        self, head_name: str, num_choices: int = 2, layers: int = 2, activation_function: str | None = "tanh",
        overwrite_ok: bool = False, id2label: dict[int, str] | None = None, use_pooler: bool = False,
        *, set_active: bool = True,
    ) -> None:
        """Multiple choice: inputs [batch, num_choices, seq]; logits [batch, num_choices]."""
        config = {"num_choices": num_choices, "layers": layers, "activation_function": activation_function,
                  "id2label": id2label, "use_pooler": use_pooler}
        self._add_head(MultipleChoiceHead.from_config(head_name, self.config, config), overwrite_ok, set_active)

    def add_qa_head(
        self, head_name: str, num_labels: int = 2, layers: int = 1, activation_function: str | None = "tanh",
        overwrite_ok: bool = False, id2label: dict[int, str] | None = None, *, set_active: bool = True,
    ) -> None:
        """Extractive question answering (start/end logits per token)."""
        config = {"num_labels": num_labels, "layers": layers, "activation_function": activation_function,
                  "id2label": id2label}
        self._add_head(QuestionAnsweringHead.from_config(head_name, self.config, config), overwrite_ok, set_active)

    def add_causal_lm_head(
        self, head_name: str, activation_function: str | None = "gelu", layers: int = 2, overwrite_ok: bool = False,
        *, layer_norm: bool = True, bias: bool = True, shift_labels: bool = True, set_active: bool = True,
    ) -> None:
        """Causal LM head (AdapterHub's defaults). The vocabulary projection shares the input embeddings
        when the backbone ties them (config.tie_word_embeddings); `layers=1, bias=False` is then exactly
        the pretrained LM head of GPT-2 (or a tied Llama)."""
        config = {"layers": layers, "activation_function": activation_function, "layer_norm": layer_norm,
                  "bias": bias, "shift_labels": shift_labels}
        self._add_head(CausalLMHead.from_config(head_name, self.config, config), overwrite_ok, set_active)

    def add_seq2seq_lm_head(self, head_name: str, layers: int = 1, overwrite_ok: bool = False, *,
                            set_active: bool = True) -> None:
        """An encoder-decoder's LM head (AdapterHub's seq2seq_lm defaults); with tied embeddings (T5, BART) and
        layers=1 it is the pretrained LM head of T5ForConditionalGeneration (BART: without final_logits_bias)."""
        config = {"layers": layers, "activation_function": None, "layer_norm": False, "bias": False,
                  "shift_labels": False}
        self._add_head(Seq2SeqLMHead.from_config(head_name, self.config, config), overwrite_ok, set_active)

    def add_head_from_config(self, head_name: str, config: dict[str, Any], overwrite_ok: bool = False,
                             set_active: bool = True) -> None:
        """Add a head from a head config dict (the "config" object of a head_config.json)."""
        self._add_head(build_head(head_name, self.config, config), overwrite_ok, set_active)

    def delete_head(self, head_name: str) -> None:
        """Remove a head (no-op when absent); an active head setup that names it is cleared."""
        if head_name not in self.heads:
            return
        del self.heads[head_name]
        self._owned_heads.discard(head_name)
        if head_name in head_leaves(self._active_head):
            self._active_head = None

    def delete_adapter(self, name: str) -> None:
        """Delete the adapter, and its head too when that head was loaded together with it."""
        super().delete_adapter(name)
        if name in self._owned_heads:
            self.delete_head(name)

    def has_head(self, name: str) -> bool:
        return name in self.heads

    # -- head files (the hooks AdapterModelMixin's save/load/train call) -------------------------
    def _head_files(self, name: str) -> tuple[dict, dict] | None:
        return head_files(self, name, adapter_model_class(self.config.model_type).__name__)

    def _load_head_files(self, name: str, files: AdapterFiles) -> None:
        load_head_files(self, name, files.head_config or {}, files.head_state)

    def _unfreeze_head(self, name: str) -> None:
        unfreeze_head(self, name)

    # -- active heads --------------------------------------------------------------------------
    def _check_head_setup(self, spec: HeadSpec) -> HeadSpec:
        if isinstance(spec, list | tuple):
            spec = list(spec)
        elif spec is not None and not isinstance(spec, str | BatchSplit | Parallel):
            raise ValueError(f"{spec!r} is not a head setup (use a name, a list, BatchSplit or Parallel)")
        missing = [n for n in head_leaves(spec) if n not in self.heads]
        if missing:
            raise ValueError(f"no head named {missing[0]!r}; heads: {sorted(self.heads)}")
        return spec

    @property
    def active_head(self) -> HeadSpec:
        """The head setup used when neither `head=` nor an AdapterSetup names one."""
        return self._active_head

    @active_head.setter
    def active_head(self, heads: HeadSpec) -> None:
        self._active_head = self._check_head_setup(heads)

    def set_active_heads(self, heads: HeadSpec) -> None:
        self.active_head = heads

    def set_active_adapters(self, setup: Any) -> None:
        """Activate adapters; also activate the heads the setup implies when all of them exist."""
        super().set_active_adapters(setup)
        implied = default_head_setup(self.active_adapters)
        leaves = head_leaves(implied)
        if implied is not None and leaves and all(n in self.heads for n in leaves):
            self._active_head = implied

    def get_labels_dict(self, head_name: str | None = None) -> dict[int, str] | None:
        name = head_name if head_name is not None else self._active_head
        if not isinstance(name, str) or name not in self.heads:
            raise ValueError(f"no single head named {name!r}")
        return self.heads[name].id2label

    def get_labels(self, head_name: str | None = None) -> list[str] | None:
        mapping = self.get_labels_dict(head_name)
        return None if mapping is None else [mapping[i] for i in sorted(mapping)]

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None, head: HeadSpec = None, labels: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None, end_positions: torch.Tensor | None = None,
        return_dict: bool | None = None, **kwargs: Any,
    ) -> Any:
        """Run the backbone under the current setup, then the heads (`head=` wins over AdapterSetup's
        head_setup, which wins over `active_head`; none: the backbone output unchanged)."""
        inputs, n_choices = flatten_choices({
            "input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "position_ids": position_ids, "inputs_embeds": inputs_embeds,
        })
        ref = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds")
        ctx = self.build_forward_context(int(ref.shape[0]), int(ref.shape[1]))
        k = ctx.replicate
        if getattr(self.config, "is_encoder_decoder", False):
            kwargs = self._decoder_inputs(inputs, labels, kwargs)
        if k > 1:
            kwargs = {key: replicate_batch(v, k) if key in BATCH_KWARGS else v for key, v in kwargs.items()}
        with forward_context(ctx):
            base_inputs = {key: replicate_batch(v, k) for key, v in inputs.items()} if k > 1 else inputs
            base_out = self.base_model(**base_inputs, **kwargs)
            spec = head
            if spec is None:
                spec = ctx.head_setup if ctx.head_setup is not None else self._active_head
            implied_only = head is None and all(
                h not in self.heads and self.has_adapter(h) for h in head_leaves(spec)
            )
            if spec is None or implied_only:
                out = base_out  # the setup's heads are adapters without one: the plain backbone output
            else:
                targets = {"labels": labels, "start_positions": start_positions, "end_positions": end_positions}
                run = HeadRun(self, base_out, inputs, {t: v for t, v in targets.items() if v is not None}, n_choices)
                out = run.apply(spec, 0, run.n_rows, k, explicit=head is not None)
        if return_dict is False and not isinstance(out, MultiHeadOutput):
            return out.to_tuple()
        return out

    def _decoder_inputs(self, inputs: dict, labels: torch.Tensor | None, kwargs: dict) -> dict:
        """Encoder-decoders: decoder_input_ids from the labels (or, without labels, the input ids) shifted
        right, as AdapterHub's T5/BART AdapterModels do, unless given."""
        if kwargs.get("decoder_input_ids") is not None or kwargs.get("decoder_inputs_embeds") is not None:
            return kwargs
        source = labels if labels is not None else inputs.get("input_ids")
        if source is None:
            return kwargs
        conf = self.config
        shifted = source.new_full(source.shape, int(conf.decoder_start_token_id))
        shifted[:, 1:] = source[:, :-1]
        shifted = shifted.masked_fill(shifted == -100, int(conf.pad_token_id))
        return {**kwargs, "decoder_input_ids": shifted}

    def embed(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
              **kwargs: Any) -> torch.Tensor:
        """Sentence embeddings under the current setup: `mean_pool` of the backbone's last hidden state
        ([batch, hidden]; a Parallel setup gives its k copies one after another, [k*batch, hidden])."""
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return mean_pool(out.last_hidden_state, attention_mask)


class BertAdapterModel(AdapterModel):
    model_types = ("bert",)
    pool_last_token = False


class RobertaAdapterModel(AdapterModel):
    model_types = ("roberta",)
    pool_last_token = False


class XLMRobertaAdapterModel(AdapterModel):
    model_types = ("xlm-roberta",)
    pool_last_token = False


class GPT2AdapterModel(AdapterModel):
    model_types = ("gpt2",)
    pool_last_token = True


class LlamaAdapterModel(AdapterModel):
    model_types = ("llama",)
    pool_last_token = True


class MistralAdapterModel(AdapterModel):
    model_types = ("mistral",)
    pool_last_token = True


class Qwen2AdapterModel(AdapterModel):
    model_types = ("qwen2",)
    pool_last_token = True


class T5AdapterModel(AdapterModel):
    model_types = ("t5",)
    pool_last_token = False


class MT5AdapterModel(AdapterModel):
    model_types = ("mt5",)
    pool_last_token = False


class BartAdapterModel(AdapterModel):
    model_types = ("bart",)
    pool_last_token = False


class MBartAdapterModel(AdapterModel):
    model_types = ("mbart",)
    pool_last_token = False


_CLASSES: dict[str, type[AdapterModel]] = {
    t: cls
    for cls in (BertAdapterModel, RobertaAdapterModel, XLMRobertaAdapterModel, GPT2AdapterModel,
                LlamaAdapterModel, MistralAdapterModel, Qwen2AdapterModel, T5AdapterModel, MT5AdapterModel,
                BartAdapterModel, MBartAdapterModel)
    for t in cls.model_types
}


def adapter_model_class(model_type: str) -> type[AdapterModel]:
    """The XAdapterModel class for a model_type (the generic AdapterModel for other registered types)."""
    return _CLASSES.get(model_type, AdapterModel)


class AutoAdapterModel:
    """Builds the right XAdapterModel for a checkpoint's or config's model_type."""

    @staticmethod
    def from_pretrained(path: str | os.PathLike[str], **kwargs: Any) -> AdapterModel:
        config = AutoConfig.from_pretrained(path)
        return adapter_model_class(config.model_type).from_pretrained(path, **kwargs)

    @staticmethod
    def from_config(config: PretrainedConfig, **kwargs: Any) -> AdapterModel:
        return adapter_model_class(config.model_type).from_config(config, **kwargs)
