"""Generation requests: what may be generated with, prompts (chat template), limits, and one request's events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from adapters_core.composition import AdapterCompositionBlock, Parallel, Split
from server.errors import ContextTooLong, DomainError, GenerationUnsupported, InvalidGenerationRequest
from server.execution.generator import Sampling
from server.scheduling import generation as gen
from server.scheduling.detokenize import Detokenizer
from server.scheduling.generation import GenerationScheduler
from server.scheduling.resolve import Resolved
from server.scheduling.runtime import Runtime, check_unicode

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_PROMPTS = 16


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int | None  # None: as many as the context leaves (up to ADAPTERSERVE_MAX_NEW_TOKENS)
    sampling: Sampling
    stop: tuple[str, ...] = ()


def scheduler_of(rt: Runtime) -> GenerationScheduler:
    """The generation scheduler, or a 422 saying why this backbone cannot generate."""
    if rt.generation is None:
        kind = getattr(rt.engine.config, "model_type", "?")
        raise GenerationUnsupported(
            f"the backbone {rt.engine.name!r} is an encoder-only model ({kind}) without a language-model head; "
            "completions need a causal LM backbone (e.g. --model smollm2) or an encoder-decoder LM (T5, BART)",
        )
    return rt.generation


def check_stop(stop: Sequence[str]) -> tuple[str, ...]:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidGenerationRequest(f"stop: {len(stop)} stop strings; at most {MAX_STOP_STRINGS}")
    for s in stop:
        if not s:
            raise InvalidGenerationRequest("stop: a stop string must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidGenerationRequest(f"stop: a stop string has {len(s)} characters; at most {MAX_STOP_CHARS}")
    return tuple(stop)


def check_block(block: Any) -> None:
    """Generation runs each row alone through its composition: Parallel and Split cannot be honoured."""
    if block is None or isinstance(block, str):
        return
    if isinstance(block, Parallel | Split):
        raise GenerationUnsupported(
            f"a {type(block).__name__.lower()} composition cannot be used for generation (each sequence needs one "
            "output per token); use a single adapter, stack, fuse or average",
        )
    assert isinstance(block, AdapterCompositionBlock)
    for child in block.children:
        check_block(child)


async def resolve_for_generation(rt: Runtime, tenant: str, model: str, adapters: Any) -> Resolved | None:
    """`adapters` (composition JSON) if given, else `model`: an adapter name, or the backbone's served name (None)."""
    if adapters is None and model == rt.engine.name:
        return None
    resolved = await rt.resolve(tenant, adapters if adapters is not None else model, None, "embedding")
    check_block(resolved.block)
    return resolved


def chat_prompt(rt: Runtime, messages: list[dict[str, str]]) -> list[int]:
    """The messages rendered with the tokenizer's chat template, as token ids."""
    tok = rt.engine.tokenizer
    check_unicode([m["content"] for m in messages], "message")
    if not getattr(tok, "chat_template", None):
        raise GenerationUnsupported(f"the backbone {rt.engine.name!r} has no chat template; use /v1/completions")
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template may raise on roles it does not know
        raise InvalidGenerationRequest(f"messages: the chat template refused them: {exc}") from None
    return list(tok(text, add_special_tokens=False)["input_ids"])


def text_prompts(rt: Runtime, prompt: str | list[Any]) -> list[list[int]]:
    """A string, a list of strings, one list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise InvalidGenerationRequest("prompt: at least one prompt is needed")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidGenerationRequest(f"prompt: {len(prompts)} prompts in one request; at most {MAX_PROMPTS}")
    vocab = int(getattr(rt.engine.config, "vocab_size", 0) or 0)
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            check_unicode([p], "prompt")
            ids = rt.engine.tokenize([p])[0]
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if vocab and any(t < 0 or t >= vocab for t in p):
                raise InvalidGenerationRequest(f"prompt {i}: token ids must be in [0, {vocab})")
            ids = list(p)
        else:
            raise InvalidGenerationRequest(f"prompt {i}: expected a string or a list of token ids")
        out.append(ids)
    return out


class Generation:
    """One request's sequences (one per prompt) and their merged events, from queueing to release."""

    def __init__(self, rt: Runtime, scheduler: GenerationScheduler, seqs: list[gen.Sequence], queue: asyncio.Queue[gen.Event],
                 resolved: Resolved | None) -> None:
        self.rt, self.scheduler, self.seqs, self.queue, self.resolved = rt, scheduler, seqs, queue, resolved
        self._open = len(seqs)
        self._closed = False

    async def events(self) -> AsyncIterator[gen.Event]:
        """Every Delta, then one Done or Failed per sequence."""
        while self._open:
            ev = await self.queue.get()
            if isinstance(ev, gen.Done | gen.Failed):
                self._open -= 1
            yield ev

    async def collect(self) -> tuple[list[str], list[gen.Done]]:
        """Texts and endings per prompt; the first failure is raised."""
        texts = [""] * len(self.seqs)
        done: list[gen.Done | None] = [None] * len(self.seqs)
        async for ev in self.events():
            if isinstance(ev, gen.Failed):
                raise ev.error
            if isinstance(ev, gen.Delta):
                texts[ev.index] += ev.text
            else:
                done[ev.index] = ev
        return texts, [d for d in done if d is not None]

    def close(self) -> None:
        """Cancel what still runs (a client that went away) and release the adapter versions."""
        if self._closed:
            return
        self._closed = True
        for seq in self.seqs:
            self.scheduler.cancel(seq)
        if self.resolved is not None:
            self.rt.residency.release(self.resolved.metas)


def start(rt: Runtime, tenant: str, prompts: list[list[int]], resolved: Resolved | None, params: GenerationParams) -> Generation:
    """Check every prompt against the context, the limits and the KV budget, then queue them all (or raise)."""
    scheduler = scheduler_of(rt)
    limit = rt.settings.max_new_tokens
    if params.max_tokens is not None and params.max_tokens > limit:
        raise InvalidGenerationRequest(f"max_tokens is {params.max_tokens}; the limit is {limit} (ADAPTERSERVE_MAX_NEW_TOKENS)")
    queue: asyncio.Queue[gen.Event] = asyncio.Queue()
    decode = _decoder(rt)
    seqs = []
    # versions stored before uploads recorded prefix_tokens count none (their prefixes still run, uncounted)
    prefix = sum(int(m.extra.get("prefix_tokens", 0)) for m in resolved.metas) if resolved is not None else 0
    for i, ids in enumerate(prompts):
        if not ids:
            raise InvalidGenerationRequest(f"prompt {i} has no tokens")
        max_tokens = _max_tokens(rt, i, len(ids), params.max_tokens)
        scheduler.check_fits(len(ids) + max_tokens, prefix)
        seqs.append(gen.Sequence(i, ids, resolved, max_tokens, params.sampling, Detokenizer(decode, params.stop), queue, tenant,
                                 prefix_tokens=prefix))
    if resolved is not None:
        rt.residency.hold(resolved.metas)
    try:
        scheduler.submit(seqs)
    except DomainError:
        if resolved is not None:
            rt.residency.release(resolved.metas)
        raise
    return Generation(rt, scheduler, seqs, queue, resolved)


def _max_tokens(rt: Runtime, i: int, prompt: int, asked: int | None) -> int:
    """max_tokens for prompt i (`asked`, else what the context leaves up to ADAPTERSERVE_MAX_NEW_TOKENS), or
    ContextTooLong. A causal LM holds prompt + new tokens in one context; an encoder-decoder takes the prompt into its
    encoder and generates with its decoder, each with its own limit."""
    engine, limit = rt.engine, rt.settings.max_new_tokens
    if not engine.seq2seq_lm:
        context = engine.max_positions
        max_tokens = asked if asked is not None else min(limit, context - prompt)
        if max_tokens < 1 or prompt + max_tokens > context:
            raise ContextTooLong(
                f"prompt {i} has {prompt} tokens and max_tokens is {max_tokens}: {prompt + max_tokens} tokens, "
                f"over the context of {context} tokens",
            )
        return max_tokens
    if prompt > engine.max_positions:
        raise ContextTooLong(f"prompt {i} has {prompt} tokens; the encoder of {engine.name!r} takes at most "
                             f"{engine.max_positions}")
    max_tokens = asked if asked is not None else min(limit, engine.max_new_positions)
    if max_tokens > engine.max_new_positions:
        raise ContextTooLong(f"max_tokens is {max_tokens}; the decoder of {engine.name!r} generates at most "
                             f"{engine.max_new_positions} tokens")
    return max_tokens


def _decoder(rt: Runtime) -> Any:
    tok = rt.engine.tokenizer

    def decode(ids: list[int]) -> str:
        return str(tok.decode(ids, skip_special_tokens=True))

    return decode
