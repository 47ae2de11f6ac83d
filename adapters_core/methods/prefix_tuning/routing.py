"""Which prefixes each row of the current forward pass attends to: the lookup the attention wrapper calls.

A model's prefixes hang at ``<base>.prefix_tuning.prefix_tunings.<name>.self_prefix`` (AdapterHub's key
path); `PrefixState` holds them and answers, per attention layer, the padded [batch, heads, P, head_dim]
keys and values and the keep mask of the rows the routing plan gives a prefix. Results are cached in the
ForwardContext: all layers come from one gather when every row has at most one full-depth prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...routing import ForwardContext
from ..base import Host
from .module import PrefixTuningModule, gather_all_layers, gather_prefixes

#: (keys, values, keep, every row keeps every prefix position: decided on the host from the plan).
PrefixKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]

#: The key of the prefix tuning room's state in `Host.rooms`.
ROOM = "prefix_tuning"


@dataclass
class PrefixState:
    """A model's prefix modules and, per adapter, its layers' positions in them (leave_out skips layers)."""

    prefix_tunings: nn.ModuleDict
    n_layers: int
    layer_index: dict[str, dict[int, int]] = field(default_factory=dict)

    def module(self, name: str) -> PrefixTuningModule:
        return self.prefix_tunings[name]["self_prefix"]

    def prefix_for(self, layer: int, batch: int) -> PrefixKV | None:
        """(keys, values, keep) for attention layer `layer` under the current context, or None."""
        ctx = ForwardContext.current()
        if ctx is None or ctx.plan is None or not len(self.prefix_tunings):
            return None
        cache = ctx.prefix_states
        if layer in cache:
            return cache[layer]
        present = frozenset(self.prefix_tunings.keys())
        rows = [tuple(n for n in stack if n in present) for stack in ctx.plan.rows]
        if not any(rows):
            cache[layer] = None
            return None
        if len(rows) != batch:
            raise ValueError(f"prefix routing expected {len(rows)} rows, attention got {batch}")
        fast = self._all_layers(ctx, rows)
        if fast is not None:
            kv, keep = fast
            lengths = [self.module(r[0]).prefix_length if r else 0 for r in rows]
            found = (kv[:, layer, 0], kv[:, layer, 1], keep, min(lengths) == max(lengths))
            cache[layer] = found
            return found
        kvs = {n: self.module(n).key_values() for n in {n for r in rows for n in r}}
        per_row = []
        for stack in rows:
            entries = []
            for n in stack:
                idx = self.layer_index[n].get(layer)
                if idx is not None:
                    entries.append(kvs[n][idx])
            per_row.append(entries)
        ref = next(iter(self.prefix_tunings.parameters()))
        gathered = gather_prefixes(per_row, ref.device, ref.dtype)
        lengths = [sum(k.shape[1] for k, _ in row) for row in per_row]
        found = None if gathered is None else (*gathered, min(lengths) == max(lengths))
        cache[layer] = found
        return found

    def _all_layers(self, ctx: ForwardContext, rows: list[tuple[str, ...]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The one-gather path when each row has at most one prefix that covers every layer."""
        if "_all" in ctx.prefix_states:
            return ctx.prefix_states["_all"]
        names = sorted({n for r in rows for n in r})
        full = all(len(self.layer_index[n]) == self.n_layers for n in names)
        if not full or any(len(r) > 1 for r in rows):
            ctx.prefix_states["_all"] = None
            return None
        modules = [self.module(n) for n in names]
        slot = [names.index(r[0]) if r else -1 for r in rows]
        ref = next(iter(self.prefix_tunings.parameters()))
        result = gather_all_layers(modules, slot, ref.device, ref.dtype)
        ctx.prefix_states["_all"] = result
        return result


def lookup(module: nn.Module, batch: int) -> PrefixKV | None:
    """The attention wrapper's lookup: the prefixes of a wired attention module's layer (None elsewhere)."""
    state: PrefixState | None = getattr(module, "_adapterserve_prefix", None)
    return state.prefix_for(module._adapterserve_layer, batch) if state is not None else None


def prefixes(host: Host) -> PrefixState:
    """The prefix tuning room's state on `host`."""
    return host.rooms[ROOM]
