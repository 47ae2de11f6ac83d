"""Iteration-level generation on the model side: a per-slot KV cache, chunked prefill, one decode forward per step.

Layout: per layer one key and one value tensor [slots, kv_heads, capacity, head_dim]. Decoding sequences sit in
slots 0..d-1, each with its own length; a decode step feeds one token per row, writes each row's key/value at
that row's own position, and attends over [:d, :, :max_len+1] (a view, no copy) with a per-row mask. A sequence
that leaves is replaced by the last slot's sequence (one sequence copied). A new sequence is prefilled in chunks
into a small cache of its own and copied into the next free slot once (O(prompt)). The buffers grow (copying the
live rows) when a sequence needs more rows or length than allocated, and are freed when nothing runs.

Every method here runs on the thread (or process) that owns the model.
"""

from __future__ import annotations

import json
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters_core.composition import AdapterCompositionBlock, BatchSplit, Fuse, Stack

Block = AdapterCompositionBlock | str | None

_CAUSAL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2"})
_ROUND = 64  # the smallest slot capacity, in tokens


def is_causal_lm(config: Any) -> bool:
    """A decoder-only language model (it has, or ties, an LM head over its last hidden state)."""
    archs = getattr(config, "architectures", None) or []
    return config.model_type in _CAUSAL_TYPES or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


@dataclass(frozen=True)
class KVShape:
    """Per-token KV cache size of a backbone, so the scheduler can budget without the model."""

    layers: int
    kv_heads: int
    head_dim: int
    itemsize: int

    @classmethod
    def of(cls, config: Any, dtype: torch.dtype) -> KVShape:
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(int(config.num_hidden_layers), kv, head_dim, torch.empty((), dtype=dtype).element_size())

    @property
    def token_bytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.itemsize

    def bytes(self, rows: int, length: int) -> int:
        """Bytes of a [rows, length] slot buffer (keys and values, all layers)."""
        return rows * length * self.token_bytes


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: all
    seed: int | None = None
    ignore_eos: bool = False  # run to max_tokens (benchmarks)


@dataclass(frozen=True)
class SeqSpec:
    """A sequence to start: prompt ids, composition over model-side names (None: the bare backbone)."""

    id: int
    prompt: tuple[int, ...]
    block: Block
    max_tokens: int
    sampling: Sampling = Sampling()


@dataclass(frozen=True)
class Emitted:
    """One sequence's news from a step: a new token (None for EOS or an error) and, when it ended, why."""

    id: int
    token: int | None
    finish: str | None = None  # "stop" (EOS) | "length" | "error"
    error: str | None = None


@dataclass(frozen=True)
class StepResult:
    events: list[Emitted]
    kv_bytes: int  # slot buffers plus prefill caches allocated now
    running: int  # sequences holding cache after the step
    decoded: int  # rows in this step's decode forward (0: none ran)


@dataclass(frozen=True)
class Limits:
    """What the scheduler promised: it never admits more than fits, so growth may round up within these."""

    budget_bytes: int
    max_rows: int
    prefill_chunk: int = 512


class SlotCache:
    """The `cache` object HF attention layers call `update` on; what it writes where is set before each forward."""

    def __init__(self, shape: KVShape, rows: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
        dims = (rows, shape.kv_heads, length, shape.head_dim)
        self.keys = [torch.zeros(dims, device=device, dtype=dtype) for _ in range(shape.layers)]
        self.values = [torch.zeros(dims, device=device, dtype=dtype) for _ in range(shape.layers)]
        self.rows, self.length = rows, length
        self._first = 0
        self._n = 0
        self._offset = 0
        self._positions: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self._kv_len = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def prepare_decode(self, positions: torch.Tensor) -> None:
        """Next forward: one token for each of the first len(positions) rows, written at its row's position."""
        self._first = 0
        self._n = int(positions.shape[0])
        self._positions = positions
        self._index = torch.arange(self._n, device=positions.device)
        self._kv_len = int(positions.max()) + 1

    def prepare_prefill(self, first: int, rows: int, offset: int, tokens: int) -> None:
        """Next forward: `tokens` tokens for each of rows first..first+rows-1, written from `offset`."""
        self._first, self._n, self._positions, self._index = first, rows, None, None
        self._offset = offset
        self._kv_len = offset + tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: Any, **__: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._positions is not None:
            k[self._index, :, self._positions] = key_states[:, :, 0]
            v[self._index, :, self._positions] = value_states[:, :, 0]
        else:
            end = self._offset + key_states.shape[2]
            k[self._first : self._first + self._n, :, self._offset : end] = key_states
            v[self._first : self._first + self._n, :, self._offset : end] = value_states
        rows = slice(self._first, self._first + self._n)
        return k[rows, :, : self._kv_len], v[rows, :, : self._kv_len]

    def get_seq_length(self, *_: Any) -> int:
        return self._kv_len

    def copy_row(self, src: SlotCache, src_row: int, dst_row: int, length: int) -> None:
        if src is self and src_row == dst_row:
            return
        for mine, theirs in ((self.keys, src.keys), (self.values, src.values)):
            for a, b in zip(mine, theirs, strict=True):
                a[dst_row, :, :length] = b[src_row, :, :length]


@dataclass(eq=False)
class _Seq:
    spec: SeqSpec
    length: int = 0  # tokens in the cache
    last: int = -1  # sampled token not yet fed to the model
    generated: int = 0
    rng: torch.Generator | None = None
    reserve: int = 0


def lm_head_weight(model: Any, model_path: str) -> torch.Tensor:
    """The backbone's LM head projection: the input embeddings when tied, else `lm_head.weight` from its files."""
    base = getattr(model, "base_model", model)
    emb = base.get_input_embeddings().weight
    if getattr(model.config, "tie_word_embeddings", True):
        return emb
    from safetensors import safe_open

    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    name = "lm_head.weight"
    file = json.loads(index.read_text())["weight_map"].get(name) if index.is_file() else "model.safetensors"
    if not file or not (folder / file).is_file():
        raise ValueError(f"{model_path} has untied embeddings but no {name} in safetensors files")
    with safe_open(str(folder / file), "pt") as f:
        return f.get_tensor(name).to(device=emb.device, dtype=emb.dtype)


def eos_ids(model_path: str, config: Any) -> frozenset[int]:
    """End-of-sequence ids as HF generate sees them (generation_config.json, else the model config)."""
    value: Any = None
    gen = Path(model_path) / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
    if value is None:
        value = getattr(config, "eos_token_id", None)
    if value is None:
        return frozenset()
    return frozenset(int(v) for v in (value if isinstance(value, list) else [value]))


def setup_for_rows(blocks: list[Block]) -> Block | BatchSplit:
    """One setup for rows in order: the shared block, or a BatchSplit over runs of equal blocks."""
    runs: list[tuple[Block, int]] = []
    for b in blocks:
        if runs and runs[-1][0] == b:
            runs[-1] = (b, runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    if len(runs) == 1:
        return runs[0][0]
    children = [Stack(b) if isinstance(b, Fuse) else b for b, _ in runs]  # a Fuse sits in a BatchSplit inside a Stack
    return BatchSplit(*children, batch_sizes=[n for _, n in runs])  # type: ignore[arg-type]


class Generator:
    """The running set of one backbone: admits, cancels and advances sequences one step at a time.

    Slots 0..d-1 hold decoding sequences; slot d holds the sequence whose long prompt is being prefilled chunk by
    chunk, if any. Short prompts waiting together are prefilled in one forward straight into slots d, d+1, ...
    """

    def __init__(self, model: Any, model_path: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.base = getattr(model, "base_model", model)
        self.device, self.dtype = device, dtype
        self.shape = KVShape.of(model.config, dtype)
        self.head = lm_head_weight(model, model_path)
        self.eos = eos_ids(model_path, model.config)
        self.pad = int(getattr(model.config, "pad_token_id", None) or 0)
        self.additive = getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa",)
        self.cache: SlotCache | None = None
        self.decoding: list[_Seq] = []
        self.partial: _Seq | None = None  # at slot len(decoding), prompt partly in the cache
        self.prefilling: deque[_Seq] = deque()  # admitted, nothing in the cache yet

    # -- the step ----------------------------------------------------------------------------------
    def step(self, admit: list[SeqSpec], cancel: list[int], limits: Limits) -> StepResult:
        """Cancel, admit, one prefill forward (a chunk of one long prompt, or several short prompts whole) and one
        decode forward over every decoding sequence."""
        events: list[Emitted] = []
        for seq_id in cancel:
            self._drop(seq_id)
        for spec in admit:
            self._admit(spec)
        if self.partial is not None or self.prefilling:
            events += self._prefill(limits)
        decoded = len(self.decoding)
        if self.decoding:
            events += self._decode(limits)
        if not self.decoding and self.partial is None:
            self.cache = None
        running = len(self.decoding) + len(self.prefilling) + (self.partial is not None)
        return StepResult(events, self.kv_bytes, running, decoded)

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def reset(self) -> None:
        self.cache = None
        self.decoding.clear()
        self.partial = None
        self.prefilling.clear()

    # -- admission and leaving ----------------------------------------------------------------------
    def _admit(self, spec: SeqSpec) -> None:
        self.prefilling.append(_Seq(spec, rng=sequence_rng(spec.sampling, self.device), reserve=len(spec.prompt) + spec.max_tokens))

    def _drop(self, seq_id: int) -> None:
        for seq in list(self.prefilling):
            if seq.spec.id == seq_id:
                self.prefilling.remove(seq)
                return
        if self.partial is not None and self.partial.spec.id == seq_id:
            self.partial = None
            return
        for i, seq in enumerate(self.decoding):
            if seq.spec.id == seq_id:
                self._leave(i)
                return

    def _leave(self, i: int) -> None:
        """Free slot i: the last decoding sequence moves into it, and the partial one down by one slot."""
        last = len(self.decoding) - 1
        assert self.cache is not None
        moved = self.decoding[last]
        self.cache.copy_row(self.cache, last, i, moved.length)
        self.decoding[i] = moved
        self.decoding.pop()
        if self.partial is not None:
            self.cache.copy_row(self.cache, last + 1, last, self.partial.length)

    def _room(self, rows: int, length: int, extra: list[_Seq], limits: Limits) -> None:
        """Make the slot buffers hold `rows` rows of `length` tokens. They grow by doubling (copying the live rows),
        never past the longest reserve (prompt + max_tokens) of the live and incoming sequences, nor the budget."""
        old = self.cache
        if old is not None and rows <= old.rows and length <= old.length:
            return
        live = [*self.decoding, *([self.partial] if self.partial is not None else [])]
        cap = max(s.reserve for s in (*live, *extra))
        old_rows, old_len = (old.rows, old.length) if old is not None else (0, 0)
        want_rows = max(rows, min(limits.max_rows, 2 * old_rows))
        want_len = max(old_len, min(cap, max(length, 2 * old_len, _ROUND)))
        if self.shape.bytes(want_rows, want_len) > limits.budget_bytes:
            want_rows, want_len = max(rows, old_rows), max(length, old_len)
            if self.shape.bytes(want_rows, want_len) > limits.budget_bytes:
                want_rows, want_len = rows, length
        self.cache = None
        fresh = SlotCache(self.shape, want_rows, want_len, self.device, self.dtype)
        if old is not None:
            for i, s in enumerate(live):
                fresh.copy_row(old, i, i, s.length)
        self.cache = fresh

    # -- forwards -----------------------------------------------------------------------------------
    def _prefill(self, limits: Limits) -> list[Emitted]:
        if self.partial is None and len(self.prefilling[0].spec.prompt) > limits.prefill_chunk:
            self.partial = self.prefilling.popleft()
        if self.partial is not None:
            return self._prefill_chunk(self.partial, limits)
        batch = [self.prefilling.popleft()]
        total = len(batch[0].spec.prompt)
        while self.prefilling and total + len(self.prefilling[0].spec.prompt) <= limits.prefill_chunk:
            total += len(self.prefilling[0].spec.prompt)
            batch.append(self.prefilling.popleft())
        return self._prefill_whole(batch, limits)

    def _prefill_chunk(self, seq: _Seq, limits: Limits) -> list[Emitted]:
        """The next chunk of one long prompt, written into slot d."""
        slot = len(self.decoding)
        self._room(slot + 1, seq.length + min(limits.prefill_chunk, len(seq.spec.prompt) - seq.length), [seq], limits)
        assert self.cache is not None
        prompt = seq.spec.prompt
        start = seq.length
        chunk = prompt[start : start + limits.prefill_chunk]
        n = len(chunk)
        ids = torch.tensor([chunk], device=self.device)
        pos = torch.arange(start, start + n, device=self.device)[None]
        mask = (torch.arange(start + n, device=self.device)[None, :] <= pos[0, :, None])[None, None]
        self.cache.prepare_prefill(slot, 1, start, n)
        logits = self._forward(ids, pos, mask, self.cache, [seq.spec.block], None)
        seq.length += n
        if seq.length < len(prompt):
            return []
        self.partial = None
        self.decoding.append(seq)
        return self._first_tokens([seq], logits)

    def _prefill_whole(self, batch: list[_Seq], limits: Limits) -> list[Emitted]:
        """Several whole prompts in one forward (right-padded), written into slots d, d+1, ..."""
        first = len(self.decoding)
        self._room(first + len(batch), max(len(s.spec.prompt) for s in batch), batch, limits)
        assert self.cache is not None
        lengths = torch.tensor([len(s.spec.prompt) for s in batch], device=self.device)
        width = int(lengths.max())
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long, device=self.device)
        for r, s in enumerate(batch):
            ids[r, : len(s.spec.prompt)] = torch.tensor(s.spec.prompt, device=self.device)
        ar = torch.arange(width, device=self.device)
        pos = ar[None].expand(len(batch), width)
        mask = (ar[None, None, :] <= ar[None, :, None]) & (ar[None, None, :] < lengths[:, None, None])
        self.cache.prepare_prefill(first, len(batch), 0, width)
        logits = self._forward(ids, pos, mask[:, None], self.cache, [s.spec.block for s in batch], lengths - 1)
        for s in batch:
            s.length = len(s.spec.prompt)
        self.decoding.extend(batch)
        return self._first_tokens(batch, logits)

    def _first_tokens(self, seqs: list[_Seq], logits: torch.Tensor) -> list[Emitted]:
        events = [self._advance(s, t) for s, t in zip(seqs, self._sample(logits, seqs), strict=True)]
        for e in events:
            if e.finish is not None:
                self._drop(e.id)
        return events

    def _decode(self, limits: Limits) -> list[Emitted]:
        seqs = self.decoding
        self._room(len(seqs) + (self.partial is not None), max(s.length for s in seqs) + 1, [], limits)
        assert self.cache is not None
        ids = torch.tensor([[s.last] for s in seqs], device=self.device)
        positions = torch.tensor([s.length for s in seqs], device=self.device)
        self.cache.prepare_decode(positions)
        kv_len = int(positions.max()) + 1
        mask = (torch.arange(kv_len, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        logits = self._forward(ids, positions[:, None], mask, self.cache, [s.spec.block for s in seqs], None)
        for s in seqs:
            s.length += 1
        tokens = self._sample(logits, seqs)
        events = [self._advance(s, t) for s, t in zip(list(seqs), tokens, strict=True)]
        for e in events:
            if e.finish is not None:
                self._drop(e.id)
        return events

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: SlotCache,
                 blocks: list[Block], last: torch.Tensor | None) -> torch.Tensor:
        """Logits at each row's last position (or at `last[row]`), under each row's composition."""
        from adapters_core import AdapterSetup

        if self.additive:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(~mask, torch.finfo(self.dtype).min)
        setup = setup_for_rows(blocks)
        with torch.inference_mode(), AdapterSetup(setup) if setup is not None else nullcontext():
            out = self.base(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            hidden = out.last_hidden_state
            rows = hidden[:, -1] if last is None else hidden[torch.arange(hidden.shape[0], device=self.device), last]
            return (rows @ self.head.T).float()

    # -- sampling -----------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        return sample_tokens(logits, seqs)

    def _advance(self, seq: _Seq, token: int) -> Emitted:
        return advance(seq, token, self.eos)


def sequence_rng(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """A sampled sequence's own generator, seeded by the request's seed (else at random); None when greedy."""
    if sampling.temperature <= 0:
        return None
    rng = torch.Generator(device=device)
    rng.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return rng


def sample_tokens(logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
    """Each row's next token: argmax when greedy, else drawn with the row's sampling parameters and generator."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, seq in enumerate(seqs):
        p = seq.spec.sampling
        if p.temperature <= 0 or seq.rng is None:
            out.append(int(greedy[row]))
            continue
        out.append(sample_row(logits[row], p, seq.rng))
    return out


def advance(seq: _Seq, token: int, eos: frozenset[int]) -> Emitted:
    """`token` sampled for `seq`: the event it makes (a token, or its end at EOS or max_tokens)."""
    seq.generated += 1
    seq.last = token
    if token in eos and not seq.spec.sampling.ignore_eos:
        return Emitted(seq.spec.id, None, "stop")
    if seq.generated >= seq.spec.max_tokens:
        return Emitted(seq.spec.id, token, "length")
    return Emitted(seq.spec.id, token)


def sample_row(logits: torch.Tensor, p: Sampling, rng: torch.Generator) -> int:
    """Temperature, then top-k, then top-p (nucleus), then one draw from `rng`."""
    scores = logits / p.temperature
    if p.top_k > 0 and p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        cut = torch.cumsum(probs, dim=-1) - probs > p.top_p
        sorted_scores = sorted_scores.masked_fill(cut, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=rng).item())
