"""Prefixes kept in the caller's KV cache (kv_cache.py): `cached_prefix` hands over what the attention wrapper
would prepend, and a forward under `prefixes_in_cache` over a cache that starts with those keys gives exactly the
outputs of the usual forward, where the wrapper prepends them (GPT-2's fused c_attn, Llama's GQA and RoPE)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from adapters_core import AdapterSetup, BatchSplit, Stack
from adapters_core.methods.prefix_tuning.routing import PrefixState

from .tiny_models import add_adapter, build, make_ids

PREFIXES = {"pa": "prefix_tuning[prefix_length=3,bottleneck_size=16]",
            "pb": "prefix_tuning_flat[prefix_length=5]",
            "pleave": "prefix_tuning[prefix_length=3,bottleneck_size=16,leave_out=[0]]"}


@pytest.fixture(scope="module", params=[(a, i) for a in ("gpt2", "llama") for i in ("eager", "sdpa")], ids=str)
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    arch, attn = request.param
    m = build(arch, attn)
    for seed, (name, config) in enumerate(PREFIXES.items()):
        add_adapter(m, name, config, 10 + seed)
    add_adapter(m, "lora", "lora", 20)
    return m


def _layers(model: torch.nn.Module, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    state: PrefixState = model._host.rooms["prefix_tuning"]
    return list(state.module(name).key_values())


def test_cached_prefix_is_what_the_wrapper_prepends(model: torch.nn.Module) -> None:
    with torch.no_grad():
        pa, pb = _layers(model, "pa"), _layers(model, "pb")
        one = model.cached_prefix("pa")
        assert one is not None and one.shape == (2, 2, pa[0][0].shape[0], 3, pa[0][0].shape[2])
        for layer, (k, v) in enumerate(pa):
            assert torch.equal(one[layer, 0], k) and torch.equal(one[layer, 1], v)
        assert torch.equal(model.cached_prefix(Stack("pa", "lora")), one)  # other methods add no prefix
        both = model.cached_prefix(Stack("pa", "pb"))
        assert both is not None and both.shape[3] == 8
        for layer in range(2):  # the wrapper's order: the last of the stack first
            assert torch.equal(both[layer, 0], torch.cat([pb[layer][0], pa[layer][0]], dim=1))
            assert torch.equal(both[layer, 1], torch.cat([pb[layer][1], pa[layer][1]], dim=1))
        assert model.cached_prefix("lora") is None and model.cached_prefix(None) is None
        assert model.cached_prefix("pleave") is None  # no prefix at layer 0: left to the wrapper


def _cache_forward(model: torch.nn.Module, ids: torch.Tensor, setup: object, rows: list[str | None]) -> torch.Tensor:
    """The forward with each marked row's prefix written into a DynamicCache first: columns [pad ; prefix ; tokens]
    per row, tokens at positions 0.., the mask showing each row its own prefix and its causal tokens."""
    b, t = ids.shape
    kvs = [model.cached_prefix(r) if r is not None else None for r in rows]
    p = max((kv.shape[3] for kv in kvs if kv is not None), default=0)
    ref = next(kv for kv in kvs if kv is not None)
    heads, dim = ref.shape[2], ref.shape[4]
    cache = DynamicCache(config=model.config)
    for layer in range(model.config.num_hidden_layers):
        keys = torch.zeros(b, heads, p, dim)
        values = torch.zeros(b, heads, p, dim)
        for r, kv in enumerate(kvs):
            if kv is not None:
                keys[r, :, p - kv.shape[3]:] = kv[layer, 0]
                values[r, :, p - kv.shape[3]:] = kv[layer, 1]
        cache.update(keys, values, layer)
    visible = torch.zeros(b, 1, t, p + t, dtype=torch.bool)
    for r, kv in enumerate(kvs):
        if kv is not None:
            visible[r, :, :, p - kv.shape[3]:p] = True
    visible[:, :, :, p:] = torch.ones(t, t, dtype=torch.bool).tril()
    mask: torch.Tensor = visible
    if model.config._attn_implementation != "sdpa":
        mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    position_ids = torch.arange(t)[None].expand(b, t)
    with torch.no_grad(), AdapterSetup(setup), model.prefixes_in_cache([kv is not None for kv in kvs]):
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                               use_cache=True)
    assert cache.get_seq_length() == p + t
    return out.last_hidden_state


def test_a_forward_over_cached_prefixes_equals_the_prepending_forward(model: torch.nn.Module,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ids = make_ids(4, 6)
    rows = [Stack("pa", "lora"), "pb", Stack("pb", "pa"), "pleave"]
    setup = BatchSplit(*rows, batch_sizes=[1, 1, 1, 1])
    with torch.no_grad(), AdapterSetup(setup):
        want = model.base_model(input_ids=ids).last_hidden_state
    prepended: list[int] = []
    original = PrefixState.prefix_for

    def counting(self: PrefixState, location: str, layer: int, batch: int):  # type: ignore[no-untyped-def]
        found = original(self, location, layer, batch)
        if found is not None:
            prepended.append(int(found[2].sum(dim=1).gt(0).sum()))  # rows that get a prefix prepended
        return found

    monkeypatch.setattr(PrefixState, "prefix_for", counting)
    got = _cache_forward(model, ids, setup, [rows[0], rows[1], rows[2], None])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert prepended == [1]  # the leave_out row alone, at its one prefixed layer: no other row is prepended
