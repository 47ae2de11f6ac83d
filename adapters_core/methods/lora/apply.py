"""LoRA and (IA)^3 applied to the rows of a mixed batch at one linear layer.

Rows sharing a kind and shape run as one gathered bmm (or, at inference, as in-place updates of their
contiguous row runs); a fused layer's adapter covers only the output columns in `out_index`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ...routing import shared_tensor
from ..batching import row_index, segment_runs
from ..stack_cache import StackCache, stack_params
from .layer import LinearAdapter


def _scatter(out: torch.Tensor, out_index: torch.Tensor | None,
             fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if out_index is None:
        return fn(out)
    res = out.clone()
    res[..., out_index] = fn(out[..., out_index])
    return res


def apply_loras(
    loras: nn.ModuleDict,
    groups: Sequence[tuple[tuple[str, ...], Sequence[int]]],
    x: torch.Tensor,
    out: torch.Tensor,
    out_index: torch.Tensor | None,
    skip: str | None = None,
    cache: StackCache | None = None,
) -> torch.Tensor:
    """Return `out` with every routed row's LoRA/IA3 applied; `skip` names an adapter merged into the weight."""
    n_rows = out.shape[0]
    result = out
    batched: dict[tuple, list[tuple[LinearAdapter, Sequence[int]]]] = {}
    for names, rows in groups:
        names = tuple(n for n in names if n != skip)
        if not names:
            continue
        mods = [loras[n] for n in names]
        if len(mods) == 1:
            batched.setdefault(mods[0].shape_key(), []).append((mods[0], rows))
            continue
        idx = row_index(rows, n_rows, out.device)
        xs = x if idx is None else x[idx]
        hidden: torch.Tensor | None = None
        for mod in mods:
            hidden = mod.stack_step(hidden, xs)
        result = combine_rows(result, idx, hidden, mods[-1].kind, out_index)
    for members in batched.values():
        if _segmented_add(members, n_rows, x, result, out_index):
            continue
        all_rows = [r for _, rows in members for r in rows]
        idx = row_index(all_rows, n_rows, out.device)
        xs = x if idx is None else x[idx]
        mods = [m for m, _ in members]
        if len(mods) == 1:
            mod = mods[0]
            hidden = mod(xs) if mod.kind == "add" else mod.vector()
        else:
            slots = [i for i, (_, rows) in enumerate(members) for _ in rows]
            one_each = slots == list(range(len(members)))  # one row per adapter, in order: no gather
            hidden = _gathered(mods, None if one_each else shared_tensor(slots, out.device), xs, cache)
        result = combine_rows(result, idx, hidden, mods[0].kind, out_index)
    return result


def _segmented_add(members: Sequence[tuple[LinearAdapter, Sequence[int]]], n_rows: int, x: torch.Tensor,
                   out: torch.Tensor, out_index: torch.Tensor | None) -> bool:
    """Inference: each adapter updates its contiguous runs of rows in place (out[a:b] += s * x A^T B^T, one
    addmm when all columns are covered, or *= the IA3 vector). No gather or per-row weight copy; returns
    False (nothing done) when autograd must see the update, in training, or past SEGMENT_MAX_RUNS runs."""
    if any(mod.training for mod, _ in members) or out_index is None and not out.is_contiguous():
        return False
    if torch.is_grad_enabled() and (out.requires_grad or any(p.requires_grad for m, _ in members for p in m.parameters())):
        return False
    runs = segment_runs(members, n_rows)
    if runs is None:
        return False
    width = out.shape[-1]
    for mod, slices in runs:
        for sl in slices:
            block = out if sl is None else out[sl]
            if mod.kind == "scale":
                if out_index is None:
                    block.mul_(mod.vector())
                else:
                    block[..., out_index] *= mod.vector()
                continue
            xs = x if sl is None else x[sl]
            down = xs.reshape(-1, xs.shape[-1]) @ mod.lora_A.t()
            if out_index is None:
                block.view(-1, width).addmm_(down, mod.b_effective().t(), alpha=mod.scaling)
            else:
                up = (down @ mod.b_effective().t()).mul_(mod.scaling)
                block.index_add_(block.dim() - 1, out_index, up.view(*block.shape[:-1], -1))
    return True


def _gathered(mods: Sequence[LinearAdapter], slot: torch.Tensor | None, xs: torch.Tensor,
              cache: StackCache | None = None) -> torch.Tensor:
    """Row r of xs through the LoRA (or IA3 vector) of slot[r] (slot None: row r uses module r), in one bmm
    pair; stacked weights come from `cache` when no gradient is recorded."""
    s = shared_tensor([m.scaling for m in mods], xs.device, xs.dtype)
    if mods[0].kind == "scale":
        if cache is not None and not torch.is_grad_enabled():
            b_t, _ = cache.gather([(m.lora_B, None) for m in mods], slot)  # [R, 1, out]: one index_select
            vecs = b_t[:, 0, :] * (s if slot is None else s[slot])[:, None]
        else:
            vecs = torch.stack([m.vector() for m in mods])
            vecs = vecs if slot is None else vecs[slot]  # [R, out]
        return vecs.view(vecs.shape[0], *([1] * (xs.dim() - 2)), vecs.shape[-1])
    if cache is not None and not torch.is_grad_enabled():
        a_t, _ = cache.gather([(m.lora_A, None) for m in mods], slot)  # [R, in, r]
        b_t, _ = cache.gather([(m.b_effective(), None) for m in mods], slot)  # [R, r, out]
    else:
        a_t, _ = stack_params([(m.lora_A, None) for m in mods])  # [S, in, r]
        b_t, _ = stack_params([(m.b_effective(), None) for m in mods])  # [S, r, out]
        if slot is not None:
            a_t, b_t = a_t[slot], b_t[slot]
    if slot is not None:
        s = s[slot]
    flat = xs.reshape(xs.shape[0], -1, xs.shape[-1])
    y = torch.bmm(torch.bmm(flat, a_t), b_t) * s[:, None, None]
    return y.reshape(*xs.shape[:-1], y.shape[-1])


def combine_rows(
    result: torch.Tensor, idx: torch.Tensor | None, hidden: torch.Tensor, kind: str, out_index: torch.Tensor | None
) -> torch.Tensor:
    """`result` with `hidden` added ("add") or multiplied in ("scale") on rows `idx` and columns `out_index`."""

    def op(block: torch.Tensor) -> torch.Tensor:
        return block + hidden if kind == "add" else block * hidden

    if out_index is None and (not torch.is_grad_enabled() or not (result.requires_grad or hidden.requires_grad)):
        # inference: update the layer's fresh output in place (these are large, memory-bound tensors)
        if idx is None:
            return result.add_(hidden) if kind == "add" else result.mul_(hidden)
        if kind == "add":
            return result.index_add_(0, idx, hidden)
    if idx is None:
        return _scatter(result, out_index, op)
    rows = result[idx]
    return result.index_copy(0, idx, _scatter(rows, out_index, op))
