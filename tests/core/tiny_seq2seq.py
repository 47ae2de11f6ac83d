"""Tiny seeded encoder-decoders (T5, Flan-T5's gated FFN, MT5, BART, mBART) and a synthetic seq2seq task.

d_model 32, 2 encoder + 2 decoder layers, 4 heads, vocabulary 100, dropout off; the same (arch, seed)
gives bit-identical weights. Used by the seq2seq method, composition and generation tests.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModel,
    AutoModelForSeq2SeqLM,
    BartConfig,
    MBartConfig,
    MT5Config,
    PretrainedConfig,
    T5Config,
)

from adapters_core import AdapterSetup, init

VOCAB = 100
SEQ2SEQ = ("t5", "flan_t5", "mt5", "bart", "mbart")
GENERATE = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "num_beams": 1, "suppress_tokens": [0, 1, 2]}


def _t5_kwargs() -> dict:
    return {"vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
            "num_heads": 4, "dropout_rate": 0.0, "relative_attention_num_buckets": 8, "decoder_start_token_id": 0,
            "pad_token_id": 0, "eos_token_id": 1}


def _bart_kwargs() -> dict:
    return {"vocab_size": VOCAB, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
            "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64,
            "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "pad_token_id": 1,
            "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2, "forced_eos_token_id": None, "init_std": 0.3}


def tiny_seq2seq_config(arch: str) -> PretrainedConfig:
    if arch == "t5":
        return T5Config(**_t5_kwargs())
    if arch == "flan_t5":
        return T5Config(**_t5_kwargs(), feed_forward_proj="gated-gelu")
    if arch == "mt5":
        return MT5Config(**_t5_kwargs(), feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    if arch == "bart":
        return BartConfig(**_bart_kwargs())
    if arch == "mbart":
        return MBartConfig(**_bart_kwargs())
    raise ValueError(arch)


def build_seq2seq(arch: str, seed: int = 0, attn: str = "eager", bare: bool = False) -> torch.nn.Module:
    """A tiny random *ForConditionalGeneration (bare: the T5Model/BartModel) with adapter support."""
    torch.manual_seed(seed)
    auto = AutoModel if bare else AutoModelForSeq2SeqLM
    return init(auto.from_config(tiny_seq2seq_config(arch), attn_implementation=attn)).eval()


def seq2seq_inputs(batch: int = 3, src: int = 7, tgt: int = 5, seed: int = 123, pad_last: int = 2) -> dict:
    """Random source ids (3..VOCAB) with the last row right-padded by `pad_last` (mask 0), and decoder ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, src), generator=g)
    mask = torch.ones(batch, src, dtype=torch.long)
    if pad_last:
        mask[-1, src - pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "decoder_input_ids": torch.randint(3, VOCAB, (batch, tgt), generator=g)}


def copy_task(batch: int = 4, length: int = 6, seed: int = 7) -> dict:
    """A synthetic seq2seq batch: the target is the source reversed (labels; decoder ids come from them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.flip(-1)}


def logits(model: torch.nn.Module, inputs: dict, setup: object = None) -> torch.Tensor:
    with torch.no_grad(), AdapterSetup(setup):
        return model(**inputs).logits


def generate(model: torch.nn.Module, inputs: dict, setup: object = None, **kwargs: object) -> torch.Tensor:
    with torch.no_grad(), AdapterSetup(setup):
        out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             **{**GENERATE, **kwargs})
    return out[:, -GENERATE["max_new_tokens"]:]
