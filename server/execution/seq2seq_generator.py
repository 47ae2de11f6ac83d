"""Iteration-level generation for encoder-decoder LMs (T5, MT5, BART, mBART): the sibling of generator.Generator.

The same interface (`step(admit, cancel, limits) -> StepResult`) and the same parts: `SlotCache` buffers, the
per-row setup (`setup_for_rows`), sampling, EOS. Per decoder layer there are four buffers: the self-attention keys and
values [slots, heads, capacity, head_dim], as in generator.py, and the cross-attention keys and values
[slots, heads, source capacity, head_dim], written once per sequence. The encoder states themselves are not kept.

A step: cancels leave; waiting sequences whose prompts fit one prefill (`prefill_chunk` prompt tokens together, or one
longer prompt alone: an encoder is not chunked) run one forward: the encoder over their prompts (right-padded, each
row with its own composition) and the decoder's first step (the start token) into the next free slots. That step
computes each row's cross-attention keys and values from its encoder states under its own adapter (so LoRA or IA3 on
cross-attention apply) and writes them into its slot, and it gives the row's first token. Then one decoder forward
runs over every decoding sequence, one token each: it reads each row's cross keys and values in place (views, no
copy), masked by the row's own source length, and each row's self-attention keys and values up to its own length. A
sequence that leaves is replaced by the last slot's (one sequence copied); the buffers grow (copying the live rows)
and are freed when nothing runs.

Positions: every row's new token sits at that row's own length. transformers' T5 and BART decoders take one position
for the whole batch (the cache length), so during these forwards `RowPositions` makes the decoder's own position
module answer per row: BART's learned position embedding returns each row's embedding; T5's relative-bias module
(`compute_bias`, also what prefix tuning calls to recompute the bias over [prefix; keys]) returns one bias per row.

Limits (`position_limits`): BART-family decoders and encoders have learned positions, so both take at most
`max_position_embeddings` tokens; T5's relative positions have no hard bound, so both sides take `n_positions` when
the config has it, else 512, the length T5 was pretrained on.

Every method here runs on the thread (or process) that owns the model.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import EncoderDecoderCache

from adapters_core.routing import host_to_device
from server.execution.generator import (
    _ROUND,
    Emitted,
    KVShape,
    Limits,
    SeqSpec,
    SlotCache,
    StepResult,
    _Seq,
    advance,
    eos_ids,
    failed_event,
    lm_head_weight,
    sample_tokens,
    sequence_rng,
    setup_for_rows,
)

_SEQ2SEQ_TYPES = frozenset({"t5", "mt5", "bart", "mbart"})
T5_POSITIONS = 512  # T5's pretraining length; its relative positions set no bound of their own


def is_seq2seq_lm(config: Any) -> bool:
    """An encoder-decoder language model this generator serves (its LM head ties or sits beside the decoder)."""
    return bool(getattr(config, "is_encoder_decoder", False)) and config.model_type in _SEQ2SEQ_TYPES


def position_limits(config: Any) -> tuple[int, int]:
    """(prompt tokens the encoder takes, tokens the decoder generates) at most."""
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or T5_POSITIONS
    return int(n), int(n)


def decoder_kv_shape(config: Any, dtype: torch.dtype) -> KVShape:
    """Per-token cache size of the decoder: a self-attention token and a cross-attention (source) token cost the same."""
    layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or config.num_hidden_layers
    heads = int(getattr(config, "decoder_attention_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "d_kv", None) or config.d_model // heads)
    return KVShape(int(layers), heads, head_dim, torch.empty((), dtype=dtype).element_size())


def generation_kv_shape(config: Any, dtype: torch.dtype) -> KVShape:
    """The KV shape the generation scheduler budgets with, for either kind of generating backbone."""
    return decoder_kv_shape(config, dtype) if is_seq2seq_lm(config) else KVShape.of(config, dtype)


def _generation_config(model_path: str) -> dict[str, Any]:
    gen = Path(model_path) / "generation_config.json"
    return dict(json.loads(gen.read_text())) if gen.is_file() else {}


def _checkpoint_tensor(model_path: str, name: str) -> torch.Tensor | None:
    """`name` from the checkpoint's safetensors files, or None when no file holds it."""
    from safetensors import safe_open

    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"].get(name) if index.is_file() else "model.safetensors"
    if not file or not (folder / file).is_file():
        return None
    with safe_open(str(folder / file), "pt") as f:
        return f.get_tensor(name) if name in f.keys() else None


@dataclass(frozen=True)
class _LayerKV:
    keys: torch.Tensor
    values: torch.Tensor


class _CrossSlots:
    """The cross-attention side of the cache: `update` writes new rows' keys/values (prefill); `layers[i]` holds the
    decoding rows' views (decode), which HF's attention reads instead of projecting the encoder states again."""

    def __init__(self, slots: SlotCache, read: tuple[int, int] | None) -> None:
        self.slots = slots
        rows, width = read or (0, 0)
        self.layers = [_LayerKV(k[:rows, :, :width], v[:rows, :, :width]) for k, v in zip(slots.keys, slots.values, strict=True)] if read else []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slots.update(key_states, value_states, layer_idx)


class _SlotPair(EncoderDecoderCache):
    """The `cache` HF's T5/BART layers see: the self-attention slots and the cross-attention slots. `read` (rows, source
    width) marks every layer's cross keys/values as present (decode); None lets the layers compute and write them."""

    def __init__(self, own: SlotCache, cross: SlotCache, read: tuple[int, int] | None) -> None:  # no super(): no DynamicCaches
        self.self_attention_cache = own  # type: ignore[assignment]
        self.cross_attention_cache = _CrossSlots(cross, read)  # type: ignore[assignment]
        self.is_updated = dict.fromkeys(range(len(own.keys)), read is not None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens before the one each row feeds now, counted for the longest row (RowPositions corrects the others)."""
        return self.self_attention_cache.get_seq_length() - 1  # type: ignore[no-any-return]


class RowPositions:
    """During one forward, the decoder's position module answers with each row's own position (its query's)."""

    def __init__(self, decoder: Any) -> None:
        self.absolute = getattr(decoder, "embed_positions", None)  # BART, mBART: learned positions
        self.relative = None  # T5, MT5: the relative-bias module of the first layer's self-attention
        if self.absolute is None:
            attention = decoder.block[0].layer[0].SelfAttention
            if not getattr(attention, "has_relative_attention_bias", False):
                raise ValueError(f"{type(decoder).__name__} has neither learned positions nor a relative position bias")
            self.relative = attention

    @contextmanager
    def at(self, positions: torch.Tensor, past: int) -> Iterator[None]:
        """Row r's token is at `positions[r]`; the decoder itself assumes `past` (the longest row's)."""
        if self.absolute is not None:
            module = self.absolute
            handle = module.register_forward_hook(
                lambda m, args, out: torch.nn.functional.embedding(positions[:, None] + m.offset, m.weight))
            try:
                yield
            finally:
                handle.remove()
            return
        module = self.relative
        module.compute_bias = lambda q, k, device=None, past_seen_tokens=0: _row_bias(module, q, k, positions + (past_seen_tokens - past))
        try:
            yield
        finally:
            del module.compute_bias


def _row_bias(module: Any, q_len: int, k_len: int, starts: torch.Tensor) -> torch.Tensor:
    """T5's relative position bias [rows, heads, q, k] with row r's queries at starts[r], starts[r] + 1, ..."""
    device = module.relative_attention_bias.weight.device
    context = torch.arange(q_len, device=device)[None, :, None] + starts.to(device)[:, None, None]
    memory = torch.arange(k_len, device=device)[None, None, :]
    buckets = module._relative_position_bucket(memory - context, bidirectional=not module.is_decoder,
                                               num_buckets=module.relative_attention_num_buckets,
                                               max_distance=module.relative_attention_max_distance)
    return module.relative_attention_bias(buckets).permute(0, 3, 1, 2)


@dataclass(eq=False)
class _EncSeq(_Seq):
    source: int = 0  # prompt tokens: the width of its cross keys/values


class Seq2SeqGenerator:
    """The running set of one encoder-decoder backbone; slots 0..d-1 of both caches hold the decoding sequences."""

    def __init__(self, model: Any, model_path: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.base = getattr(model, "base_model", model)
        self.device, self.dtype = device, dtype
        config = model.config
        self.shape = decoder_kv_shape(config, dtype)
        self.head = lm_head_weight(model, model_path)
        bias = _checkpoint_tensor(model_path, "final_logits_bias")  # BART adds it to its logits
        self.head_bias = None if bias is None else bias.reshape(-1).to(device=device, dtype=dtype)
        self.scale = float(config.d_model) ** -0.5 if getattr(config, "scale_decoder_outputs", False) else 1.0  # T5
        self.eos = eos_ids(model_path, config)
        start = _generation_config(model_path).get("decoder_start_token_id", getattr(config, "decoder_start_token_id", None))
        self.pad = int(getattr(config, "pad_token_id", None) or 0)
        self.start = self.pad if start is None else int(start)
        self.additive = getattr(config, "_attn_implementation", "sdpa") not in ("sdpa",)
        self.positions = RowPositions(self.base.get_decoder())
        self.own: SlotCache | None = None  # decoder self-attention
        self.cross: SlotCache | None = None  # decoder cross-attention
        self.decoding: list[_EncSeq] = []
        self.waiting: deque[_EncSeq] = deque()  # admitted, not encoded yet

    # -- the step ----------------------------------------------------------------------------------
    def step(self, admit: list[SeqSpec], cancel: list[int], limits: Limits) -> StepResult:
        """Cancel, admit, one prefill forward (encoder + first decoder step of new prompts), one decode forward."""
        events: list[Emitted] = []
        for seq_id in cancel:
            self._drop(seq_id)
        for spec in admit:
            n = len(spec.prompt)
            self.waiting.append(_EncSeq(spec, rng=sequence_rng(spec.sampling, self.device), reserve=n + spec.max_tokens, source=n))
        if self.waiting:
            events += self._prefill(limits)
        decoded = len(self.decoding)
        if self.decoding:
            events += self._decode(limits)
        if not self.decoding:
            self.own = self.cross = None
        return StepResult(events, self.kv_bytes, len(self.decoding) + len(self.waiting), decoded, self.kv_used_bytes)

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in (self.own, self.cross) if c is not None)

    @property
    def kv_used_bytes(self) -> int:
        """Bytes of the columns live rows hold: their decoder tokens so far and their prompts' cross keys/values."""
        return sum(s.length + s.source for s in self.decoding) * self.shape.token_bytes

    def reset(self) -> None:
        self.own = self.cross = None
        self.decoding.clear()
        self.waiting.clear()

    # -- leaving and room ---------------------------------------------------------------------------
    def _drop(self, seq_id: int) -> None:
        for seq in list(self.waiting):
            if seq.spec.id == seq_id:
                self.waiting.remove(seq)
                return
        for i, seq in enumerate(self.decoding):
            if seq.spec.id == seq_id:
                last = self.decoding.pop()
                if i < len(self.decoding):  # the last sequence moves into the freed slot
                    assert self.own is not None and self.cross is not None
                    self.own.copy_row(self.own, len(self.decoding), i, last.length)
                    self.cross.copy_row(self.cross, len(self.decoding), i, last.source)
                    self.decoding[i] = last
                return

    def _room(self, rows: int, length: int, source: int, incoming: list[_EncSeq], limits: Limits) -> None:
        """Make both caches hold `rows` rows, `length` decoder tokens and `source` prompt tokens. Rows and decoder
        length grow by doubling, never past max_rows, the longest max_tokens of the live and incoming sequences, nor
        the budget; the source width is the longest prompt's."""
        own, cross = self.own, self.cross
        if own is not None and cross is not None and rows <= own.rows and length <= own.length and source <= cross.length:
            return
        live = list(self.decoding)
        old_rows, old_len, old_src = (own.rows, own.length, cross.length) if own is not None and cross is not None else (0, 0, 0)
        cap = max(s.spec.max_tokens for s in (*live, *incoming))
        want = (max(rows, min(limits.max_rows, 2 * old_rows)), max(old_len, min(cap, max(length, 2 * old_len, _ROUND))),
                max(old_src, source))
        for candidate in (want, (max(rows, old_rows), max(length, old_len), max(source, old_src)), (rows, length, source)):
            want = candidate
            if self.shape.bytes(want[0], want[1] + want[2]) <= limits.budget_bytes:
                break
        self.own = self.cross = None
        fresh_own = SlotCache(self.shape, want[0], want[1], self.device, self.dtype)
        fresh_cross = SlotCache(self.shape, want[0], want[2], self.device, self.dtype)
        if own is not None and cross is not None:
            for i, s in enumerate(live):
                fresh_own.copy_row(own, i, i, s.length)
                fresh_cross.copy_row(cross, i, i, s.source)
        self.own, self.cross = fresh_own, fresh_cross

    # -- forwards -----------------------------------------------------------------------------------
    def _prefill(self, limits: Limits) -> list[Emitted]:
        """Encode the next prompts (up to prefill_chunk tokens together) and run their first decoder step."""
        batch = [self.waiting.popleft()]
        total = batch[0].source
        while self.waiting and total + self.waiting[0].source <= limits.prefill_chunk:
            total += self.waiting[0].source
            batch.append(self.waiting.popleft())
        first, n = len(self.decoding), len(batch)
        width = max(s.source for s in batch)
        self._room(first + n, 1, width, batch, limits)
        assert self.own is not None and self.cross is not None
        ids = torch.full((n, width), self.pad, dtype=torch.long, device=self.device)
        for r, s in enumerate(batch):
            ids[r, : s.source] = torch.tensor(s.spec.prompt, device=self.device)
        sources = torch.tensor([s.source for s in batch], device=self.device)
        self.own.prepare_prefill(first, n, [0] * n, 1)
        self.cross.prepare_prefill(first, n, [0] * n, width)
        inputs = {"input_ids": ids, "attention_mask": (torch.arange(width, device=self.device)[None] < sources[:, None]).long(),
                  "decoder_input_ids": torch.full((n, 1), self.start, dtype=torch.long, device=self.device)}
        own_mask = torch.ones((n, 1, 1, 1), dtype=torch.bool, device=self.device)
        logits = self._forward(inputs, own_mask, _SlotPair(self.own, self.cross, None), torch.zeros(n, dtype=torch.long, device=self.device),
                               [s.spec.block for s in batch])
        for s in batch:
            s.length = 1
        self.decoding.extend(batch)
        return self._emit(batch, logits)

    def _decode(self, limits: Limits) -> list[Emitted]:
        seqs = self.decoding
        n = len(seqs)
        self._room(n, max(s.length for s in seqs) + 1, max(s.source for s in seqs), [], limits)
        assert self.own is not None and self.cross is not None
        lengths, source_lengths = [s.length for s in seqs], [s.source for s in seqs]
        packed = host_to_device([lengths, source_lengths, [s.last for s in seqs]], self.device)  # one copy per step
        positions, sources = packed[0], packed[1]
        width, kv_len = max(source_lengths), max(lengths) + 1  # from the host: no device sync
        self.own.prepare_decode(positions, None, kv_len)
        own_mask = (torch.arange(kv_len, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        source_mask = (torch.arange(width, device=self.device)[None, :] < sources[:, None])[:, None, None, :]
        states = torch.zeros((), dtype=self.dtype, device=self.device).expand(n, width, self.head.shape[1])  # never read
        inputs = {"encoder_outputs": (states,), "attention_mask": self._mask(source_mask),
                  "decoder_input_ids": packed[2][:, None]}
        logits = self._forward(inputs, own_mask, _SlotPair(self.own, self.cross, (n, width)), positions, [s.spec.block for s in seqs])
        for s in seqs:
            s.length += 1
        return self._emit(list(seqs), logits)

    def _mask(self, mask: torch.Tensor) -> torch.Tensor:
        if not self.additive:
            return mask
        return torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(~mask, torch.finfo(self.dtype).min)

    def _forward(self, inputs: dict[str, Any], own_mask: torch.Tensor, cache: _SlotPair, positions: torch.Tensor,
                 blocks: list[Any]) -> torch.Tensor:
        """Logits of each row's new token, under each row's composition."""
        from adapters_core import AdapterSetup

        setup = setup_for_rows(blocks)
        with torch.inference_mode(), AdapterSetup(setup) if setup is not None else nullcontext(), \
                self.positions.at(positions, cache.get_seq_length()):
            out = self.base(**inputs, decoder_attention_mask=self._mask(own_mask), cache=cache, use_cache=True)
            logits = (out.last_hidden_state[:, -1] * self.scale) @ self.head.T
            if self.head_bias is not None:
                logits = logits + self.head_bias
            return logits.float()

    def _emit(self, seqs: list[_EncSeq], logits: torch.Tensor) -> list[Emitted]:
        events = [failed_event(s, t) if isinstance(t, Exception) else advance(s, t, self.eos)
                  for s, t in zip(seqs, sample_tokens(logits, seqs), strict=True)]
        for e in events:
            if e.finish is not None:
                self._drop(e.id)
        return events
