"""LoRA (additive low-rank update) and (IA)^3 (multiplicative scaling vector) on linear layers.

A target layer may be fused (GPT-2's c_attn holds q, k and v): then an adapter covers only the enabled
thirds, listed in `out_index`, and LoRA's B is block-diagonal over them (AdapterHub's grouped conv1d).
Application is per row: rows sharing a kind and shape run as one gathered bmm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import bottleneck
from .bottleneck import StackCache, row_index, stack_params


class LoRA(nn.Module):
    """delta(x) = dropout(x) @ A^T @ B_eff^T * alpha / r, written into the enabled outputs."""

    kind = "add"

    def __init__(self, in_features: int, out_enabled: int, groups: int, config: object):
        super().__init__()
        if config.composition_mode != "add":
            raise ValueError("LoRA needs composition_mode='add'")
        self.r, self.groups = config.r, groups
        self.scaling = config.alpha / config.r
        self.lora_A = nn.Parameter(torch.zeros(config.r * groups, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_enabled, config.r))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        with torch.no_grad():
            if config.init_weights == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
            elif config.init_weights == "bert":
                self.lora_A.normal_(0.0, 0.02)
                self.lora_B.normal_(0.0, 0.02)
            elif config.init_weights == "ia3":
                self.lora_A.fill_(1.0)
                self.lora_B.fill_(1.0)
            else:
                raise ValueError(f"unknown init_weights {config.init_weights!r}")

    def b_effective(self) -> torch.Tensor:
        """B as one (out_enabled, r * groups) matrix: block-diagonal when the layer is fused."""
        if self.groups == 1:
            return self.lora_B
        return torch.block_diag(*self.lora_B.chunk(self.groups, dim=0))

    def delta_weight(self) -> torch.Tensor:
        """(out_enabled, in) update that merging adds to the base weight."""
        return self.b_effective() @ self.lora_A * self.scaling

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lora_dropout(hidden) @ self.lora_A.t() @ self.b_effective().t() * self.scaling

    def shape_key(self) -> tuple:
        return ("add", tuple(self.lora_A.shape), tuple(self.lora_B.shape))


class IA3(nn.Module):
    """out[..., enabled] *= lora_B * alpha (a learned vector per output feature)."""

    kind = "scale"

    def __init__(self, out_enabled: int, config: object):
        super().__init__()
        if config.composition_mode != "scale":
            raise ValueError("(IA)^3 needs composition_mode='scale'")
        if config.r != 1:
            raise ValueError(f"(IA)^3 needs r=1, got r={config.r}")
        if config.dropout > 0:
            raise ValueError("(IA)^3 does not support dropout")
        self.scaling = float(config.alpha)
        self.lora_B = nn.Parameter(torch.zeros(out_enabled, 1))
        with torch.no_grad():
            if config.init_weights == "ia3":
                self.lora_B.fill_(1.0)
            elif config.init_weights == "bert":
                self.lora_B.normal_(0.0, 0.02)
            elif config.init_weights != "lora":
                raise ValueError(f"unknown init_weights {config.init_weights!r}")

    def vector(self) -> torch.Tensor:
        return self.lora_B[:, 0] * self.scaling

    def forward(self, hidden: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        vec = self.vector()
        return vec.expand(like.shape[:-1] + vec.shape) if hidden is None else hidden * vec

    def shape_key(self) -> tuple:
        return ("scale", tuple(self.lora_B.shape))


def _scatter(out: torch.Tensor, out_index: torch.Tensor | None, fn) -> torch.Tensor:
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
    batched: dict[tuple, list[tuple[nn.Module, Sequence[int]]]] = {}
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
            if isinstance(mod, IA3):
                hidden = mod(hidden, xs[..., :1].expand(*xs.shape[:-1], mod.lora_B.shape[0]))
            else:
                hidden = mod(xs if hidden is None else hidden)
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
            hidden = mod(xs) if isinstance(mod, LoRA) else mod.vector()
        else:
            slots = [i for i, (_, rows) in enumerate(members) for _ in rows]
            one_each = slots == list(range(len(members)))  # one row per adapter, in order: no gather
            hidden = _gathered(mods, None if one_each else torch.tensor(slots, device=out.device), xs, cache)
        result = combine_rows(result, idx, hidden, mods[0].kind, out_index)
    return result


def _segmented_add(members: Sequence[tuple[nn.Module, Sequence[int]]], n_rows: int, x: torch.Tensor,
                   out: torch.Tensor, out_index: torch.Tensor | None) -> bool:
    """Inference: each adapter updates its contiguous runs of rows in place (out[a:b] += s * x A^T B^T, one
    addmm when all columns are covered, or *= the IA3 vector). No gather or per-row weight copy; returns
    False (nothing done) when autograd must see the update, in training, or past SEGMENT_MAX_RUNS runs."""
    if any(mod.training for mod, _ in members) or out_index is None and not out.is_contiguous():
        return False
    if torch.is_grad_enabled() and (out.requires_grad or any(p.requires_grad for m, _ in members for p in m.parameters())):
        return False
    runs = bottleneck.segment_runs(members, n_rows)
    if runs is None:
        return False
    width = out.shape[-1]
    for mod, slices in runs:
        for sl in slices:
            block = out if sl is None else out[sl]
            if isinstance(mod, IA3):
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


def _gathered(mods: Sequence[nn.Module], slot: torch.Tensor | None, xs: torch.Tensor,
              cache: StackCache | None = None) -> torch.Tensor:
    """Row r of xs through the LoRA (or IA3 vector) of slot[r] (slot None: row r uses module r), in one bmm
    pair; stacked weights come from `cache` when no gradient is recorded."""
    if isinstance(mods[0], IA3):
        vecs = torch.stack([m.vector() for m in mods])
        vecs = vecs if slot is None else vecs[slot]  # [R, out]
        return vecs.view(vecs.shape[0], *([1] * (xs.dim() - 2)), vecs.shape[-1])
    stack = cache.get if cache is not None and not torch.is_grad_enabled() else stack_params
    a_t, _ = stack([(m.lora_A, None) for m in mods])  # [S, in, r]
    b_t, _ = stack([(m.b_effective(), None) for m in mods])  # [S, r, out]
    s = torch.tensor([m.scaling for m in mods], dtype=xs.dtype, device=xs.device)
    if slot is not None:
        a_t, b_t, s = a_t[slot], b_t[slot], s[slot]
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
