"""What one request costs the inference worker, and the limits it must fit before it is queued.

A composition's shape, per layer of the backbone and per input:
- depth: adapters applied one after another (a stack's members add up; a fusion layer counts one more);
- width: copies of the input the backbone runs (a parallel block's branches add up; a stack multiplies them,
  since the members after a parallel block see the replicated batch);
- applications: adapter modules run, counting repeats of one adapter and every copy each one runs on.

A request's cost is counted in token passes (one token through one copy of the backbone): inputs x the longest
input's tokens (a forward pads every row to it) x (width + applications / 4). Each copy passes every layer once.
An application is counted as a quarter of a layer's pass, an upper bound on what the modules we serve add per
token: a transformer layer costs about 12 h^2 multiply-adds per token (4 h^2 attention projections, 8 h^2 FFN), an
AdapterFusion layer's query, key and value about 3 h^2, a bottleneck 2 h^2 / reduction_factor, LoRA far less.
What an application costs whatever the length (a module call, about 0.1 ms on a CPU) is bounded by
max_adapter_applications instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from adapters_core.composition import AdapterCompositionBlock, Fuse, Parallel, Stack
from server.errors import OverLimit
from server.settings import Settings


@dataclass(frozen=True)
class Shape:
    depth: int
    width: int
    applications: int


SINGLE = Shape(1, 1, 1)  # one adapter
_BASE_ROWS = Shape(0, 1, 0)  # a batch_split child of None: these rows run the bare backbone


def shape_of(block: AdapterCompositionBlock | str | None) -> Shape:
    """The shape of a composition (see the module docstring)."""
    if block is None:
        return _BASE_ROWS
    if isinstance(block, str):
        return SINGLE
    parts = [shape_of(c) for c in block.children]
    if isinstance(block, Stack):
        width, applications = 1, 0
        for part in parts:
            applications += part.applications * width
            width *= part.width
        return Shape(sum(p.depth for p in parts), width, applications)
    if isinstance(block, Parallel):
        return Shape(max(p.depth for p in parts), sum(p.width for p in parts), sum(p.applications for p in parts))
    fusion = 1 if isinstance(block, Fuse) else 0
    return Shape(max(p.depth for p in parts) + fusion, max(p.width for p in parts),
                 sum(p.applications for p in parts) + fusion)


@dataclass(frozen=True)
class Limits:
    """The per-request limits from the settings (names as in server/settings.py)."""

    max_composition_depth: int
    max_composition_width: int
    max_adapter_applications: int
    max_request_cost: int
    max_response_values: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.max_composition_depth, settings.max_composition_width, settings.max_adapter_applications,
                   settings.max_request_cost, settings.max_response_values)


def check_shape(shape: Shape, limits: Limits) -> None:
    """OverLimit naming the first limit the composition exceeds."""
    checks = (
        ("composition depth", shape.depth, "max_composition_depth", limits.max_composition_depth,
         "adapters applied one after another"),
        ("composition width", shape.width, "max_composition_width", limits.max_composition_width,
         "copies of each input, one per parallel branch"),
        ("adapter application count", shape.applications, "max_adapter_applications", limits.max_adapter_applications,
         "per layer and input, counting repeats and parallel copies"),
    )
    for label, value, name, limit, meaning in checks:
        if value > limit:
            raise OverLimit(f"{label} {value} exceeds {name} {limit} ({meaning}; over by {value - limit})")


def token_passes(rows: Sequence[Sequence[int]], shape: Shape) -> int:
    """The request's cost: inputs x longest input x (copies + adapter applications / 4), rounded up."""
    padded = len(rows) * max((len(r) for r in rows), default=0)
    return padded * shape.width + math.ceil(padded * shape.applications / 4)


def check_request(rows: Sequence[Sequence[int]], shape: Shape, values_per_input: int, limits: Limits) -> None:
    """OverLimit when the tokenized request costs more than max_request_cost or its response would hold more than
    max_response_values numbers (`values_per_input`: copies x hidden size, or the head's labels)."""
    cost = token_passes(rows, shape)
    if cost > limits.max_request_cost:
        longest = max(len(r) for r in rows)
        raise OverLimit(
            f"request cost {cost} exceeds max_request_cost {_over(limits.max_request_cost, cost)}: {len(rows)} "
            f"inputs x {longest} tokens (the longest) x ({shape.width} copies + {shape.applications} adapter "
            "applications / 4); send fewer or shorter inputs or a smaller composition"
        )
    values = len(rows) * values_per_input
    if values > limits.max_response_values:
        raise OverLimit(
            f"response of {values} numbers exceeds max_response_values {_over(limits.max_response_values, values)}"
            f": {len(rows)} inputs x {values_per_input} numbers each; send fewer inputs or fewer parallel branches"
        )


def _over(limit: int, value: int) -> str:
    return f"{limit} (over by {value - limit})"
