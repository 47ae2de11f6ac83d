"""Tiny LMs for generation tests: random causal Llama (GQA, untied head) and GPT-2 with a byte-level BPE tokenizer
trained on a few sentences and a simple chat template, and encoder-decoder T5 and BART with a word-level tokenizer of
the same sentences (no chat template); adapters for every method; the library's solo generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "the movie was great and the music was good",
    "a very boring film with a sad ending",
    "what is the capital of france? paris is the capital.",
    "<|user|>hello there\n<|assistant|>hi, how can i help?\n",
    "once upon a time a small robot learned to write stories",
]
METHODS = ("seq_bn", "double_seq_bn", "par_bn", "lora", "ia3", "compacter++", "prefix_tuning")
SEQ2SEQ_METHODS = ("seq_bn", "double_seq_bn", "par_bn", "lora", "ia3", "compacter", "prefix_tuning")
EOS = "<|endoftext|>"


def make_tokenizer(folder: Path, seq2seq: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE with a chat template (causal LMs), or, for the encoder-decoders, a word-level vocabulary of the
    corpus (every token decodes to a word of its own) that appends EOS to every text as T5's tokenizer does."""
    if seq2seq:
        words = sorted({w for line in CORPUS for w in line.split()})
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate([EOS, "<pad>", "<unk>", *words])}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 0)])
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS, "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token="<pad>")
    if not seq2seq:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def make_lm(folder: Path, family: str) -> Path:
    """A random LM of `family` ('llama', 'gpt2', 't5' or 'bart') saved with its tokenizer; seeded so the outputs are
    stable."""
    folder.mkdir(parents=True, exist_ok=True)
    seq2seq = family in ("t5", "bart")
    tok = make_tokenizer(folder, seq2seq)
    torch.manual_seed(7)
    vocab = len(tok)
    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if family == "t5":  # 32 relative-position buckets: positions up to 16 apart each get their own bias
        cfg = T5Config(vocab_size=vocab, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
                       dropout_rate=0.0, decoder_start_token_id=tok.pad_token_id, **ids)
        model = T5ForConditionalGeneration(cfg)
    elif family == "bart":
        cfg = BartConfig(vocab_size=vocab, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=256,
                         dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, bos_token_id=tok.eos_token_id,
                         decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None, init_std=0.1, **ids)
        model = BartForConditionalGeneration(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                          eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=128, n_layer=2, n_head=4, n_positions=256,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # sharper logits than the init's, so greedy choices have clear margins
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.eval().save_pretrained(str(folder))
    return folder


def load_lm(folder: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    import adapters_core

    auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(str(folder)).is_encoder_decoder else AutoModelForCausalLM
    return adapters_core.init(auto.from_pretrained(str(folder)).eval())


def make_lm_adapter(folder: Path, out: Path, config: str, seed: int) -> Path:
    """An adapter of `config` with noisy weights (so it changes the text), saved by adapters_core."""
    model = load_lm(folder)
    model.add_adapter("ad", config=config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters("ad"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_adapter(str(out), "ad")
    return out


class SoloReference:
    """The library's own answer: one sequence, HF generate with the KV cache, greedy, under AdapterSetup (an
    encoder-decoder's output starts with the decoder start token, a causal LM's with the prompt)."""

    def __init__(self, folder: Path) -> None:
        self.model = load_lm(folder)
        self.tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
        self._n = 0

    def ids(self, prompt_ids: list[int], adapter: Path | None, max_tokens: int) -> list[int]:
        from adapters_core import AdapterSetup

        name = None
        if adapter is not None:
            self._n += 1
            name = f"solo{self._n}"
            self.model.load_adapter(str(adapter), load_as=name)
        try:
            ids = torch.tensor([prompt_ids])
            with torch.inference_mode(), AdapterSetup(name):
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                          do_sample=False, use_cache=True, pad_token_id=self.tok.pad_token_id)
            new = out[0, 1 if self.model.config.is_encoder_decoder else ids.shape[1]:].tolist()
            eos = self.tok.eos_token_id
            return new[: new.index(eos)] if eos in new else new
        finally:
            if name is not None:
                self.model.delete_adapter(name)

    def composed(self, prompt: str, folders: dict[str, Path], setup: object, max_tokens: int) -> str:
        """Greedy text under a composition over adapters loaded under the given names."""
        from adapters_core import AdapterSetup

        for name, folder in folders.items():
            self.model.load_adapter(str(folder), load_as=name)
        try:
            ids = torch.tensor([self.tok(prompt)["input_ids"]])
            with torch.inference_mode(), AdapterSetup(setup):
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                          do_sample=False, use_cache=True, pad_token_id=self.tok.pad_token_id)
            return self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        finally:
            for name in folders:
                self.model.delete_adapter(name)

    def text(self, prompt: str, adapter: Path | None, max_tokens: int) -> str:
        return self.tok.decode(self.ids(self.tok(prompt)["input_ids"], adapter, max_tokens), skip_special_tokens=True)


@pytest.fixture(scope="session")
def lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lms")
    return {family: make_lm(root / family, family) for family in ("llama", "gpt2")}


@pytest.fixture(scope="session")
def lm_adapters(lm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(family, method) -> an adapter folder."""
    return make_lm_adapters(lm_dirs, METHODS, tmp_path_factory.mktemp("lm-adapters"))


def make_lm_adapters(dirs: dict[str, Path], methods: tuple[str, ...], root: Path) -> dict[tuple[str, str], Path]:
    """(family, method) -> an adapter folder of that method for that family's LM, each with its own seed."""
    out = {}
    for family, folder in dirs.items():
        for i, method in enumerate(methods):
            safe = "".join(c if c.isalnum() else "_" for c in method)
            out[(family, method)] = make_lm_adapter(folder, root / f"{family}_{safe}", method, 100 + i)
    return out
