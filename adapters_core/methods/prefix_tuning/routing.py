"""Which prefixes each row of the current forward pass attends to: the lookup the attention wrapper calls.

A model's prefixes hang at ``<base>.prefix_tuning.prefix_tunings.<name>.<location>_prefix`` (AdapterHub's
key path: self_prefix, and encoder_prefix / cross_prefix in encoder-decoders); `PrefixState` holds them and answers, per attention layer, the padded [batch, heads, P, head_dim]
keys and values and the keep mask of the rows the routing plan gives a prefix. Results are cached in the
ForwardContext: all layers come from one gather when every row has at most one full-depth prefix.
"""

from __future__ import annotations

import threading
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
    """A model's prefix modules and, per adapter and location, its layers' positions in them.

    `locations` lists, per location ("self", "encoder", "cross"), the model's layer indices with such an
    attention module; `layer_index[name][location][layer]` is that layer's position in adapter `name`'s
    module for the location (leave_out and the encoder/cross switches skip layers or whole locations).
    """

    prefix_tunings: nn.ModuleDict
    locations: dict[str, list[int]] = field(default_factory=dict)
    layer_index: dict[str, dict[str, dict[int, int]]] = field(default_factory=dict)
    _cached: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    def in_cache(self, rows: tuple[bool, ...]) -> tuple[bool, ...]:
        """Mark, on this thread, the rows whose prefixes the caller's KV cache holds (kv_cache.py); returns the
        previous marking (() = none)."""
        previous: tuple[bool, ...] = getattr(self._cached, "rows", ())
        self._cached.rows = rows
        return previous

    def module(self, name: str, location: str = "self") -> PrefixTuningModule:
        return self.prefix_tunings[name][f"{location}_prefix"]

    def prefix_for(self, location: str, layer: int, batch: int) -> PrefixKV | None:
        """(keys, values, keep) for one attention module under the current context, or None."""
        ctx = ForwardContext.current()
        if ctx is None or ctx.plan is None or not len(self.prefix_tunings):
            return None
        cache = ctx.prefix_states
        if (location, layer) in cache:
            return cache[(location, layer)]
        rows = self._routed(ctx, location)
        if not any(rows):
            cache[(location, layer)] = None
            return None
        if len(rows) != batch:
            raise ValueError(f"prefix routing expected {len(rows)} rows, attention got {batch}")
        fast = self._all_layers(ctx, location, rows)
        if fast is not None:
            kv, keep = fast
            j = self.locations[location].index(layer)
            lengths = [self.module(r[0], location).prefix_length if r else 0 for r in rows]
            found = (kv[:, j, 0], kv[:, j, 1], keep, min(lengths) == max(lengths))
            cache[(location, layer)] = found
            cache[("lengths", location, layer)] = lengths
            return found
        kvs = {n: self.module(n, location).key_values() for n in {n for r in rows for n in r}}
        per_row = []
        for stack in rows:
            entries = []
            for n in stack:
                idx = self.layer_index[n][location].get(layer)
                if idx is not None:
                    entries.append(kvs[n][idx])
            per_row.append(entries)
        ref = next(iter(self.prefix_tunings.parameters()))
        gathered = gather_prefixes(per_row, ref.device, ref.dtype)
        lengths = [sum(k.shape[1] for k, _ in row) for row in per_row]
        found = None if gathered is None else (*gathered, min(lengths) == max(lengths))
        cache[(location, layer)] = found
        cache[("lengths", location, layer)] = lengths
        return found

    def _routed(self, ctx: ForwardContext, location: str) -> list[tuple[str, ...]]:
        """Each row's prefix adapters at `location` (once per forward); rows whose prefixes sit in the caller's KV
        cache (`in_cache`) get none."""
        key = ("rows", location)
        hit = ctx.prefix_states.get(key)
        if hit is not None:
            return hit
        assert ctx.plan is not None
        present = {n for n, index in self.layer_index.items() if location in index}
        rows = [tuple(n for n in stack if n in present) for stack in ctx.plan.rows]
        cached: tuple[bool, ...] = getattr(self._cached, "rows", ())
        if cached:
            if len(cached) != len(rows):
                raise ValueError(f"prefixes_in_cache marks {len(cached)} rows, the forward routes {len(rows)}")
            rows = [() if c else r for r, c in zip(rows, cached, strict=True)]
        ctx.prefix_states[key] = rows
        return rows

    def sequence_prefix(self, location: str, stack: tuple[str, ...]) -> torch.Tensor | None:
        """[layers, 2, n_kv_heads, P, head_dim]: what one row running `stack` gets prepended at each layer of
        `location` (in the wrapper's order); None without a prefix or when P differs between layers."""
        layers = self.locations.get(location, [])
        names = [n for n in stack if location in self.layer_index.get(n, {})]
        if not names or not layers:
            return None
        kvs = {n: self.module(n, location).key_values() for n in set(names)}
        keys, values = [], []
        for layer in layers:
            row = [kvs[n][self.layer_index[n][location][layer]] for n in names if layer in self.layer_index[n][location]]
            if not row:
                return None
            # as gather_prefixes: AdapterHub prepends each stacked prefix in turn, the last of the stack ends up first
            keys.append(torch.cat([k for k, _ in reversed(row)], dim=1) if len(row) > 1 else row[0][0])
            values.append(torch.cat([v for _, v in reversed(row)], dim=1) if len(row) > 1 else row[0][1])
        if len({k.shape[1] for k in keys}) != 1:
            return None
        return torch.stack([torch.stack(keys), torch.stack(values)], dim=1)

    def _all_layers(self, ctx: ForwardContext, location: str,
                    rows: list[tuple[str, ...]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The one-gather path when each row has at most one prefix that covers every layer of the location."""
        key = ("_all", location)
        if key in ctx.prefix_states:
            return ctx.prefix_states[key]
        names = sorted({n for r in rows for n in r})
        n_layers = len(self.locations[location])
        full = all(len(self.layer_index[n][location]) == n_layers for n in names)
        if not full or any(len(r) > 1 for r in rows):
            ctx.prefix_states[key] = None
            return None
        modules = [self.module(n, location) for n in names]
        slot = [names.index(r[0]) if r else -1 for r in rows]
        ref = next(iter(self.prefix_tunings.parameters()))
        result = gather_all_layers(modules, slot, ref.device, ref.dtype)
        ctx.prefix_states[key] = result
        return result


def lookup(module: nn.Module, batch: int) -> PrefixKV | None:
    """The attention wrapper's lookup: the prefixes of a wired attention module's layer (None elsewhere)."""
    state: PrefixState | None = getattr(module, "_adapterserve_prefix", None)
    if state is None:
        return None
    return state.prefix_for(module._adapterserve_location, module._adapterserve_layer, batch)


def prefixes(host: Host) -> PrefixState:
    """The prefix tuning room's state on `host`."""
    return host.rooms[ROOM]
