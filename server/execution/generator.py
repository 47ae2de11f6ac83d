"""Iteration-level generation on the model side: a per-slot KV cache, chunked prefill, one decode forward per step.

Layout: per layer one key and one value tensor [slots, kv_heads, capacity, head_dim]. Decoding sequences sit in
slots 0..d-1, each with its own length; a decode step feeds one token per row, writes each row's key/value at
that row's own position, and attends over [:d, :, :max_len+1] (a view, no copy) with a per-row mask. A sequence
that leaves is replaced by the last slot's sequence (one sequence copied). New sequences are prefilled straight
into the next free slots (short prompts together in one forward, a long one in chunks, one per step). The buffers
grow (copying the live rows) when a sequence needs more rows or length than allocated, and are freed when nothing
runs.

Prefix tuning: a sequence's prefix keys and values are written into the front of its cache row once, before its
first prompt token (the library's `cached_prefix`); every forward then runs with the attention wrapper told that
those rows' prefixes are in the cache (`prefixes_in_cache`), so nothing is prepended or copied per step. A row's
cache holds [its prefix (P columns, possibly 0) ; its tokens]; its tokens keep positions 0, 1, ... (RoPE and
learned position embeddings see no prefix), and the per-row mask shows every row exactly its own columns.

A forward that raises is retried on smaller parts of its rows (per composition, then per sequence), so a
library error attributable to one sequence (an adapter that raises) ends that sequence alone with an error.

Every method here runs on the thread (or process) that owns the model.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters_core.composition import AdapterCompositionBlock, BatchSplit, Fuse, Stack
from adapters_core.routing import host_to_device
from server.execution.kv_cache import KVShape, SlotCache

__all__ = ["Generator", "KVShape", "Limits", "Sampling", "SeqSpec", "SlotCache", "StepResult", "is_causal_lm"]

Block = AdapterCompositionBlock | str | None
log = logging.getLogger("adapterserve.generation")

_CAUSAL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2"})
_ROUND = 64  # the smallest slot capacity, in tokens


def is_causal_lm(config: Any) -> bool:
    """A decoder-only language model (it has, or ties, an LM head over its last hidden state)."""
    archs = getattr(config, "architectures", None) or []
    return config.model_type in _CAUSAL_TYPES or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


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
    kv_bytes: int  # slot buffers allocated now
    running: int  # sequences holding cache after the step
    decoded: int  # rows in this step's decode forward (0: none ran)
    kv_used_bytes: int = 0  # of those, the columns live rows hold (prefixes and tokens)


@dataclass(frozen=True)
class Limits:
    """What the scheduler promised: it never admits more than fits, so growth may round up within these."""

    budget_bytes: int
    max_rows: int
    prefill_chunk: int = 512


@dataclass(eq=False)
class _Seq:
    spec: SeqSpec
    length: int = 0  # columns of its cache row in use: its prefix, then its tokens
    last: int = -1  # sampled token not yet fed to the model
    generated: int = 0
    rng: torch.Generator | None = None
    reserve: int = 0  # the most columns it can need: prefix + prompt + max_tokens
    prefix: int = 0  # prefix columns at the front of its cache row (written once, before its first token)
    kv: torch.Tensor | None = None  # that prefix, until it is written
    started: bool = False  # its prefix looked up (at its first prefill)

    @property
    def tokens(self) -> int:
        """Its tokens in the cache (their positions are 0..tokens-1)."""
        return self.length - self.prefix


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
        return StepResult(events, self.kv_bytes, running, decoded, self.kv_used_bytes)

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    @property
    def kv_used_bytes(self) -> int:
        """Bytes of the columns the live rows hold (each row's prefix and tokens), all layers."""
        if self.cache is None:
            return 0
        live = sum(s.length for s in self.decoding) + (self.partial.length if self.partial is not None else 0)
        return live * self.shape.token_bytes

    def reset(self) -> None:
        self.cache = None
        self.decoding.clear()
        self.partial = None
        self.prefilling.clear()

    # -- admission and leaving ----------------------------------------------------------------------
    def _admit(self, spec: SeqSpec) -> None:
        self.prefilling.append(_Seq(spec, rng=sequence_rng(spec.sampling, self.device), reserve=len(spec.prompt) + spec.max_tokens))

    def _start(self, seq: _Seq) -> None:
        """At a sequence's first prefill: the prefix its cache row starts with. None when its composition has no
        prefix, or one the library cannot hand over whole (different lengths per layer): the attention wrapper
        then prepends it at every forward, as the library's generate() does."""
        if seq.started:
            return
        kv = None
        cached_prefix = getattr(self.model, "cached_prefix", None)
        if cached_prefix is not None and seq.spec.block is not None:
            with torch.inference_mode():
                kv = cached_prefix(seq.spec.block)
        if kv is not None and kv.shape[0] == self.shape.layers:
            seq.kv, seq.prefix = kv, int(kv.shape[3])
            seq.reserve += seq.prefix
        seq.started = True

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
        """Make the slot buffers hold `rows` rows of `length` columns. They grow by doubling (copying the live rows),
        never past the longest reserve (prefix + prompt + max_tokens) of the live and incoming sequences, nor the
        budget."""
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
        """The next chunk of one long prompt, written into slot d (after its prefix, written with the first chunk)."""
        slot = len(self.decoding)
        try:
            self._start(seq)
        except Exception as exc:
            self.partial = None
            return [failed_event(seq, exc)]
        fresh = seq.length == 0
        prompt = seq.spec.prompt
        start = seq.tokens if not fresh else 0
        n = min(limits.prefill_chunk, len(prompt) - start)
        self._room(slot + 1, seq.prefix + start + n, [seq], limits)
        assert self.cache is not None
        if fresh and seq.kv is not None:
            self.cache.write_prefix(slot, seq.kv)
            seq.length, seq.kv = seq.prefix, None
        offset = seq.prefix + start
        ids = torch.tensor([prompt[start : start + n]], device=self.device)
        pos = torch.arange(start, start + n, device=self.device)[None]
        queries = offset + torch.arange(n, device=self.device)
        mask = (torch.arange(offset + n, device=self.device)[None, :] <= queries[:, None])[None, None]
        self.cache.prepare_prefill(slot, 1, [offset], n)
        try:
            logits = self._forward(ids, pos, mask, self.cache, [seq.spec.block], None, [seq.prefix > 0])
        except Exception as exc:
            self.partial = None
            return [failed_event(seq, exc)]
        seq.length = offset + n
        if seq.tokens < len(prompt):
            return []
        self.partial = None
        self.decoding.append(seq)
        return self._emit_tokens([seq], logits)

    def _prefill_whole(self, batch: list[_Seq], limits: Limits) -> list[Emitted]:
        """Several whole prompts in one forward; a sequence whose prefix lookup raises ends alone with an error."""
        events: list[Emitted] = []
        ready: list[_Seq] = []
        for s in batch:
            try:
                self._start(s)
                ready.append(s)
            except Exception as exc:
                events.append(failed_event(s, exc))
        return events + (self._prefill_rows(ready, limits) if ready else [])

    def _prefill_rows(self, batch: list[_Seq], limits: Limits) -> list[Emitted]:
        """Whole prompts (right-padded) in one forward, written into slots d, d+1, ..., each after its own prefix.
        If the forward raises, each sequence is prefilled alone, so only those that fail alone end with an error."""
        first = len(self.decoding)
        offsets = [s.prefix for s in batch]
        width = max(len(s.spec.prompt) for s in batch)
        self._room(first + len(batch), max(offsets) + width, batch, limits)
        assert self.cache is not None
        for r, s in enumerate(batch):
            if s.kv is not None:
                self.cache.write_prefix(first + r, s.kv)
        lengths = torch.tensor([len(s.spec.prompt) for s in batch], device=self.device)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long, device=self.device)
        for r, s in enumerate(batch):
            ids[r, : len(s.spec.prompt)] = torch.tensor(s.spec.prompt, device=self.device)
        ar = torch.arange(width, device=self.device)
        pos = ar[None].expand(len(batch), width)
        off = torch.tensor(offsets, device=self.device)
        cols = torch.arange(max(offsets) + width, device=self.device)[None, None, :]
        mask = (cols <= (off[:, None] + ar[None, :])[:, :, None]) & (cols < (off + lengths)[:, None, None])
        self.cache.prepare_prefill(first, len(batch), offsets, width)
        try:
            logits = self._forward(ids, pos, mask[:, None], self.cache, [s.spec.block for s in batch], lengths - 1,
                                   [s.prefix > 0 for s in batch])
        except Exception as exc:
            if len(batch) == 1:
                return [failed_event(batch[0], exc)]
            log.warning("prefill of %d sequences failed (%s: %s); prefilling them one by one", len(batch),
                        type(exc).__name__, exc)
            return [e for s in batch for e in self._prefill_rows([s], limits)]
        for s in batch:
            s.length, s.kv = s.prefix + len(s.spec.prompt), None
        self.decoding.extend(batch)
        return self._emit_tokens(batch, logits)

    def _decode(self, limits: Limits) -> list[Emitted]:
        seqs = self.decoding
        self._room(len(seqs) + (self.partial is not None), max(s.length for s in seqs) + 1, [], limits)
        try:
            logits = self._decode_forward(seqs, None)
        except Exception as exc:
            return self._decode_apart(list(seqs), exc)
        for s in seqs:
            s.length += 1
        return self._emit_tokens(list(seqs), logits)

    def _decode_forward(self, seqs: list[_Seq], slots: list[int] | None) -> torch.Tensor:
        """One token for each of `seqs` (slots 0..len-1, or the given slots), each written at its row's next column."""
        assert self.cache is not None
        columns = [s.length for s in seqs]
        # the step's routing state in one host->device copy; token positions do not count prefixes
        packed = host_to_device([[s.last for s in seqs], columns, [s.tokens for s in seqs], slots or columns], self.device)
        ids, positions, tokens = packed[0][:, None], packed[1], packed[2]
        rows = None if slots is None else packed[3]
        kv_len = max(columns) + 1  # from the host: no device sync
        self.cache.prepare_decode(positions, rows, kv_len)
        mask = (torch.arange(kv_len, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        return self._forward(ids, tokens[:, None], mask, self.cache, [s.spec.block for s in seqs], None,
                             [s.prefix > 0 for s in seqs])

    def _decode_apart(self, seqs: list[_Seq], exc: Exception) -> list[Emitted]:
        """The decode forward raised: run it again per composition (rows of equal blocks), then per sequence within a
        composition that still raises. Sequences that fail alone end with an error; the others advance as usual."""
        log.warning("decode forward of %d rows failed (%s: %s); running it per composition", len(seqs),
                    type(exc).__name__, exc)
        groups: list[tuple[Block, list[int]]] = []
        for i, s in enumerate(seqs):
            for block, idx in groups:
                if block == s.spec.block:
                    idx.append(i)
                    break
            else:
                groups.append((s.spec.block, [i]))
        out: dict[int, torch.Tensor | Exception] = {}
        for _, idx in groups:
            try:
                logits = self._decode_forward([seqs[i] for i in idx], idx)
                out.update((i, logits[j]) for j, i in enumerate(idx))
                continue
            except Exception as group_exc:
                if len(idx) == 1:
                    out[idx[0]] = group_exc
                    continue
            for i in idx:
                try:
                    out[i] = self._decode_forward([seqs[i]], [i])[0]
                except Exception as row_exc:
                    out[i] = row_exc
        good = [i for i in range(len(seqs)) if isinstance(out[i], torch.Tensor)]
        failed = [(seqs[i], out[i]) for i in range(len(seqs)) if not isinstance(out[i], torch.Tensor)]
        for i in good:
            seqs[i].length += 1
        events = [failed_event(s, e) for s, e in failed if isinstance(e, Exception)]
        if good:
            events += self._emit_tokens([seqs[i] for i in good], torch.stack([out[i] for i in good]))  # type: ignore[misc]
        for s, _ in failed:
            self._drop(s.spec.id)
        return events

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: SlotCache,
                 blocks: list[Block], last: torch.Tensor | None, in_cache: list[bool]) -> torch.Tensor:
        """Logits at each row's last position (or at `last[row]`), under each row's composition; rows marked in
        `in_cache` have their prefix in the cache (the attention wrapper prepends nothing for them)."""
        from adapters_core import AdapterSetup

        if self.additive:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(~mask, torch.finfo(self.dtype).min)
        setup = setup_for_rows(blocks)
        cached = self.model.prefixes_in_cache(in_cache) if any(in_cache) else nullcontext()
        with torch.inference_mode(), AdapterSetup(setup) if setup is not None else nullcontext(), cached:
            out = self.base(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            hidden = out.last_hidden_state
            rows = hidden[:, -1] if last is None else hidden[torch.arange(hidden.shape[0], device=self.device), last]
            return (rows @ self.head.T).float()

    # -- sampling -----------------------------------------------------------------------------------
    def _emit_tokens(self, seqs: list[_Seq], logits: torch.Tensor) -> list[Emitted]:
        """Each sequence's next token (greedy, or drawn from its own generator); a sequence that finished, or whose
        draw raised (e.g. NaN logits), leaves."""
        events = [failed_event(s, t) if isinstance(t, Exception) else self._advance(s, t)
                  for s, t in zip(seqs, sample_tokens(logits, seqs), strict=True)]
        for e in events:
            if e.finish is not None:
                self._drop(e.id)
        return events

    def _advance(self, seq: _Seq, token: int) -> Emitted:
        return advance(seq, token, self.eos)


def failed_event(seq: _Seq, exc: Exception) -> Emitted:
    """The error event of a sequence whose own forward (or prefix, or sampling) raised; the caller drops it."""
    log.warning("generation sequence %d failed: %s: %s", seq.spec.id, type(exc).__name__, exc, exc_info=exc)
    return Emitted(seq.spec.id, None, "error", f"generation failed: {type(exc).__name__}: {exc}")


def sequence_rng(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """A sampled sequence's own generator, seeded by the request's seed (else at random); None when greedy."""
    if sampling.temperature <= 0:
        return None
    rng = torch.Generator(device=device)
    rng.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return rng


def sample_tokens(logits: torch.Tensor, seqs: list[_Seq]) -> list[int | Exception]:
    """Each row's next token, or the exception its draw raised (e.g. NaN logits): argmax when greedy, else drawn
    with the row's sampling parameters and generator. The argmaxes and every draw reach the host in one copy (one
    device sync per step, not one per sampling stream)."""
    greedy = logits.argmax(dim=-1)
    out: list[int | Exception] = [0] * len(seqs)
    draws: dict[int, torch.Tensor] = {}
    for row, seq in enumerate(seqs):
        p = seq.spec.sampling
        if p.temperature > 0 and seq.rng is not None:
            try:
                draws[row] = sample_row(logits[row], p, seq.rng)
            except Exception as exc:
                out[row] = exc
    host = torch.cat([greedy, *draws.values()]).tolist() if draws else greedy.tolist()
    for row in range(len(seqs)):
        if not isinstance(out[row], Exception):
            out[row] = int(host[row])
    for k, row in enumerate(draws):
        out[row] = int(host[len(seqs) + k])
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


def sample_row(logits: torch.Tensor, p: Sampling, rng: torch.Generator) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), then one draw from `rng`: the token as a one-element tensor
    on the logits' device (the caller copies all rows' draws to the host at once)."""
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
    return torch.multinomial(probs, 1, generator=rng)
