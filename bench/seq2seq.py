"""The seq2seq setup of bench/methods.py: a t5-small-shaped random T5 with adapter support, teacher-forced."""

from __future__ import annotations

import torch
from transformers import T5Config, T5ForConditionalGeneration

from adapters_core import init

VOCAB = 32128


def t5_small_shaped(seed: int = 0) -> torch.nn.Module:
    """Random weights in t5-small's shape: d_model 512, 8 heads of 64, d_ff 2048, 6 + 6 layers."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                      num_heads=8, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return init(T5ForConditionalGeneration(config)).eval()


def seq2seq_inputs(batch: int, src_len: int, tgt_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, src_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "decoder_input_ids": torch.randint(3, VOCAB, (batch, tgt_len), generator=g)}
