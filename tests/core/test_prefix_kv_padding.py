"""On CPU, prefix attention pads [prefix ; keys] with masked positions to a multiple of 16 keys (torch's CPU
flash kernel is much slower on other lengths); the padding must not change any output."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from adapters_core.methods.prefix_tuning.attention import make_prefix_attention


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("keep_all", [True, False])
def test_padded_keys_give_the_same_attention(with_mask: bool, keep_all: bool) -> None:
    g = torch.Generator().manual_seed(0)
    b, heads, q_len, dim, p = 3, 4, 13, 8, 5  # 5 prefix + 13 keys = 18 -> padded to 32
    query, key, value = (torch.randn(b, heads, q_len, dim, generator=g) for _ in range(3))
    pk, pv = torch.randn(b, heads, p, dim, generator=g), torch.randn(b, heads, p, dim, generator=g)
    keep = torch.ones(b, p, dtype=torch.bool)
    if not keep_all:
        keep[1, :2] = False  # row 1 has a shorter prefix
    mask = None
    if with_mask:
        mask = torch.ones(b, 1, q_len, q_len, dtype=torch.bool)
        mask[2, ..., -4:] = False  # row 2 is padded
    seen: list[int] = []

    def delegate(module, q, k, v, attn_mask, **kwargs):
        seen.append(k.shape[2])
        return sdpa_attention_forward(module, q, k, v, attn_mask, **kwargs)

    module = nn.Module()
    module.is_causal = False
    outs = []
    for multiple in (1, 16):
        attention = make_prefix_attention(delegate, lambda m, n: (pk, pv, keep), as_bool=True, cpu_kv_multiple=multiple)
        outs.append(attention(module, query, key, value, mask, scaling=dim ** -0.5, dropout=0.0)[0])
    assert seen == [p + q_len, 32]
    assert torch.allclose(outs[0], outs[1], atol=1e-6), (outs[0] - outs[1]).abs().max()
