"""Tiny causal LMs for generation tests: random Llama (GQA, untied head) and GPT-2 with a byte-level BPE tokenizer
trained on a few sentences and a simple chat template; adapters for every method; the library's solo generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
EOS = "<|endoftext|>"


def make_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS, "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def make_lm(folder: Path, family: str) -> Path:
    """A random LM of `family` ('llama' or 'gpt2') saved with its tokenizer; seeded so the outputs are stable."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    torch.manual_seed(7)
    vocab = len(tok)
    if family == "llama":
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
    from transformers import AutoModelForCausalLM

    import adapters_core

    return adapters_core.init(AutoModelForCausalLM.from_pretrained(str(folder)).eval())


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
    """The library's own answer: one sequence, HF generate with the KV cache, greedy, under AdapterSetup."""

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
            new = out[0, ids.shape[1]:].tolist()
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
    root = tmp_path_factory.mktemp("lm-adapters")
    out = {}
    for family, folder in lm_dirs.items():
        for i, method in enumerate(METHODS):
            safe = "".join(c if c.isalnum() else "_" for c in method)
            out[(family, method)] = make_lm_adapter(folder, root / f"{family}_{safe}", method, 100 + i)
    return out
