"""Applying a head setup to one backbone output (used by AdapterModel.forward).

Output rows map to input rows modulo the batch size (a Parallel setup replicated the inputs k times).
A head name runs that head on its rows; BatchSplit runs each child on its row slice; Parallel runs child i
on copy i (without replication: every child on the same rows); None, or an adapter without a head, gives
the backbone output of those rows. Several outputs are returned as one MultiHeadOutput.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..composition import AdapterCompositionBlock, BatchSplit, Parallel, Stack
from ..context import default_head_setup
from .types import ClassificationHead, HeadInput, MultiHeadOutput, MultipleChoiceHead, PredictionHead

__all__ = ["HeadRun", "HeadSpec", "flatten_choices", "head_leaves"]

HeadSpec = str | AdapterCompositionBlock | list[str] | tuple[str, ...] | None


def head_leaves(spec: HeadSpec) -> tuple[str, ...]:
    """Every head name a head setup mentions (None children skipped)."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        return (spec,)
    if isinstance(spec, AdapterCompositionBlock):
        return spec.flatten()
    return tuple(n for s in spec for n in head_leaves(s))


def flatten_choices(inputs: dict[str, torch.Tensor | None]) -> tuple[dict[str, torch.Tensor], int]:
    """Drop None inputs; fold multiple-choice inputs [batch, choices, seq(, hidden)] into rows."""
    out = {k: v for k, v in inputs.items() if v is not None}
    choices = 1
    ids, emb = out.get("input_ids"), out.get("inputs_embeds")
    if (ids is not None and ids.dim() == 3) or (emb is not None and emb.dim() == 4):
        choices = int((ids if ids is not None else emb).shape[1])
        for key, value in out.items():
            keep = 2 if key == "inputs_embeds" else 1
            out[key] = value.reshape(-1, *value.shape[-keep:])
    return out, choices


class HeadOwner(Protocol):
    """What a HeadRun reads of the model (an AdapterModel)."""

    heads: nn.ModuleDict
    config: Any

    @property
    def pools_last_token(self) -> bool: ...

    def has_adapter(self, name: str) -> bool: ...

    def before_output_embeddings(self, hidden: torch.Tensor, start: int = 0, n_rows: int | None = None) -> torch.Tensor: ...


@dataclass
class HeadRun:
    """Applies a head setup to one backbone output; rows of the output map to input rows modulo batch."""

    model: HeadOwner
    base: ModelOutput
    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    n_choices: int
    _cls: torch.Tensor | None = field(default=None, init=False)

    @property
    def n_rows(self) -> int:
        return int(self.base.last_hidden_state.shape[0])

    @property
    def batch(self) -> int:
        ref = self.inputs.get("input_ids", self.inputs.get("inputs_embeds"))
        return int(ref.shape[0])

    def rows(self, start: int, stop: int) -> slice | torch.Tensor:
        """Input rows of output rows [start, stop) (a Parallel setup replicated the inputs)."""
        b = self.batch
        if stop - start <= 0 or start // b == (stop - 1) // b:
            return slice(start % b, start % b + (stop - start))
        return torch.arange(start, stop, device=self.base.last_hidden_state.device) % b

    def apply(self, spec: HeadSpec, start: int, stop: int, k_left: int, explicit: bool) -> ModelOutput:
        n = stop - start
        if spec is None:
            return self.base_slice(start, stop)
        if isinstance(spec, str):
            if spec in self.model.heads:
                return self.run_head(spec, start, stop)
            if explicit or not self.model.has_adapter(spec):
                raise ValueError(f"no head named {spec!r}; heads: {sorted(self.model.heads)}")
            return self.base_slice(start, stop)  # an adapter without a head: its rows' backbone output
        if isinstance(spec, Stack):
            return self.apply(default_head_setup(spec), start, stop, k_left, explicit)
        if isinstance(spec, BatchSplit):
            sizes = list(spec.batch_sizes)
            if sum(sizes) != n:
                raise ValueError(f"head setup {spec!r}: batch_sizes sum to {sum(sizes)} but the output has {n} rows")
            outs, at = [], start
            for child, size in zip(spec.children, sizes, strict=True):
                outs.append(self.apply(child, at, at + size, 1, explicit))
                at += size
            return _combine(outs)
        if isinstance(spec, Parallel | list | tuple):
            children = list(spec.children if isinstance(spec, Parallel) else spec)
            if k_left > 1:
                if len(children) != k_left or n % k_left:
                    raise ValueError(f"head setup {spec!r} does not match the {k_left} parallel copies of the batch")
                size = n // k_left
                return _combine([self.apply(c, start + i * size, start + (i + 1) * size, 1, explicit)
                                 for i, c in enumerate(children)])
            return _combine([self.apply(c, start, stop, 1, explicit) for c in children])
        raise ValueError(f"{spec!r} is not a head setup (use a name, a list, BatchSplit or Parallel)")

    def base_slice(self, start: int, stop: int) -> ModelOutput:
        """The backbone output restricted to rows [start, stop) (caches are dropped from partial slices)."""
        n = self.n_rows
        if start == 0 and stop == n:
            return self.base
        fields: dict[str, Any] = {}
        for key, value in self.base.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
                fields[key] = value[start:stop]
            elif isinstance(value, tuple) and value and all(
                isinstance(v, torch.Tensor) and v.shape[0] == n for v in value
            ):
                fields[key] = tuple(v[start:stop] for v in value)
        return type(self.base)(**fields)

    def _mask(self) -> torch.Tensor | None:
        mask = self.inputs.get("attention_mask")
        if mask is None and "input_ids" in self.inputs and self.model.config.pad_token_id is not None:
            mask = (self.inputs["input_ids"] != self.model.config.pad_token_id).long()
        return mask

    def cls(self) -> torch.Tensor:
        """The pooled token of every output row: first token, or (decoders) the last real token."""
        if self._cls is None:
            hidden = self.base.last_hidden_state
            if not self.model.pools_last_token:
                self._cls = hidden[:, 0]
            else:
                mask = self._mask()
                if mask is None:
                    self._cls = hidden[:, -1]
                else:
                    mask = _take(mask, self.rows(0, self.n_rows)).to(hidden.device).bool()
                    pos = torch.arange(mask.shape[1], device=hidden.device).expand_as(mask)
                    last = torch.where(mask, pos, -1).amax(dim=1).clamp(min=0)
                    self._cls = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self._cls

    def run_head(self, name: str, start: int, stop: int) -> ModelOutput:
        head: PredictionHead = self.model.heads[name]
        idx = self.rows(start, stop)
        needs_cls = isinstance(head, ClassificationHead | MultipleChoiceHead) and not head.config.get("use_pooler")
        pooled = self.base.get("pooler_output")
        mask = self.inputs.get("attention_mask")
        inp = HeadInput(
            hidden=self.base.last_hidden_state[start:stop],
            cls=self.cls()[start:stop] if needs_cls else None,
            pooled=pooled[start:stop] if pooled is not None else None,
            attention_mask=_take(mask, idx) if mask is not None else None,
            base=self.base_slice(start, stop),
            before_output=lambda h: self.model.before_output_embeddings(h, start, self.n_rows),
        )
        targets = {key: self._target(key, value, idx) for key, value in self.targets.items()}
        return head(inp, **targets)

    def _target(self, key: str, value: torch.Tensor, idx: slice | torch.Tensor) -> torch.Tensor:
        b, c = self.batch, self.n_choices
        if value.shape[0] == b:
            return _take(value, idx)
        if c > 1 and value.shape[0] * c == b:  # multiple choice: one label per example
            rows = torch.arange(b)[idx] if isinstance(idx, slice) else idx.cpu()
            if len(rows) % c or (len(rows) and int(rows[0]) % c):
                raise ValueError(f"a split of {len(rows)} rows cuts through the {c} choices of an example")
            return value[(rows[::c] // c).to(value.device)]
        raise ValueError(f"{key} has {value.shape[0]} rows but the batch has {b}")


def _take(t: torch.Tensor, idx: slice | torch.Tensor) -> torch.Tensor:
    return t[idx] if isinstance(idx, slice) else t[idx.to(t.device)]


def _combine(outs: list[ModelOutput]) -> MultiHeadOutput:
    losses = [o["loss"] for o in outs if isinstance(o, ModelOutput) and o.get("loss") is not None]
    return MultiHeadOutput(head_outputs=outs, loss=torch.stack(losses).sum() if losses else None)
