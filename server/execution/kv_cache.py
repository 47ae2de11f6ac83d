"""The generators' KV cache: per-token sizes of a backbone, and the slot buffers HF attention layers write into.

Per layer one key and one value tensor [slots, kv_heads, capacity, head_dim]; the generator sets before each
forward which rows and positions `update` writes, so a decode step writes every row at its own position and
attends over a view of the live rows (see server.execution.generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KVShape:
    """Per-token KV cache size of a backbone, so the scheduler can budget without the model."""

    layers: int
    kv_heads: int
    head_dim: int
    itemsize: int

    @classmethod
    def of(cls, config: Any, dtype: torch.dtype) -> KVShape:
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(int(config.num_hidden_layers), kv, head_dim, torch.empty((), dtype=dtype).element_size())

    @property
    def token_bytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.itemsize

    def bytes(self, rows: int, length: int) -> int:
        """Bytes of a [rows, length] slot buffer (keys and values, all layers)."""
        return rows * length * self.token_bytes


class SlotCache:
    """The `cache` object HF attention layers call `update` on; what it writes where is set before each forward."""

    def __init__(self, shape: KVShape, rows: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
        dims = (rows, shape.kv_heads, length, shape.head_dim)
        self.keys = [torch.zeros(dims, device=device, dtype=dtype) for _ in range(shape.layers)]
        self.values = [torch.zeros(dims, device=device, dtype=dtype) for _ in range(shape.layers)]
        self.rows, self.length = rows, length
        self._first = 0
        self._n = 0
        self._offset = 0
        self._positions: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self._gather = False
        self._mode = "slice"  # slice: prefill from one column; scatter: prefill from per-row columns; decode
        self._kv_len = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def prepare_decode(self, positions: torch.Tensor, rows: torch.Tensor | None = None, kv_len: int | None = None) -> None:
        """Next forward: one token for each of the first len(positions) rows (or for slots `rows`, gathered: a
        retry on some rows), written at its row's cache column `positions[i]`; `kv_len`: max(positions) + 1, when
        the caller knows it on the host."""
        self._first, self._mode = 0, "decode"
        self._n = int(positions.shape[0])
        self._positions = positions
        self._gather = rows is not None
        self._index = rows if rows is not None else torch.arange(self._n, device=positions.device)
        self._kv_len = int(positions.max()) + 1 if kv_len is None else kv_len

    def prepare_prefill(self, first: int, rows: int, offsets: list[int], tokens: int) -> None:
        """Next forward: `tokens` tokens for each of rows first..first+rows-1, row i's written from column
        `offsets[i]` (after its prefix)."""
        self._first, self._n, self._gather = first, rows, False
        self._kv_len = max(offsets) + tokens
        if len(set(offsets)) == 1:
            self._mode, self._positions, self._index, self._offset = "slice", None, None, offsets[0]
            return
        device = self.keys[0].device
        self._mode = "scatter"
        self._index = torch.arange(first, first + rows, device=device)[:, None]
        self._positions = torch.tensor(offsets, device=device)[:, None] + torch.arange(tokens, device=device)

    def write_prefix(self, row: int, kv: torch.Tensor) -> None:
        """A sequence's prefix [layers, 2, kv_heads, P, head_dim] into columns 0..P-1 of slot `row`, every layer."""
        p = kv.shape[3]
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            k[row, :, :p] = kv[layer, 0]
            v[row, :, :p] = kv[layer, 1]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: Any, **__: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._mode == "scatter":  # prefill, rows starting at different columns (after prefixes of their own)
            k[self._index, :, self._positions] = key_states.transpose(1, 2)
            v[self._index, :, self._positions] = value_states.transpose(1, 2)
        elif self._mode == "decode":
            k[self._index, :, self._positions] = key_states[:, :, 0]
            v[self._index, :, self._positions] = value_states[:, :, 0]
        else:
            end = self._offset + key_states.shape[2]
            k[self._first : self._first + self._n, :, self._offset : end] = key_states
            v[self._first : self._first + self._n, :, self._offset : end] = value_states
        if self._gather:
            assert self._index is not None
            return k.index_select(0, self._index)[:, :, : self._kv_len], v.index_select(0, self._index)[:, :, : self._kv_len]
        rows = slice(self._first, self._first + self._n)
        return k[rows, :, : self._kv_len], v[rows, :, : self._kv_len]

    def get_seq_length(self, *_: Any) -> int:
        return self._kv_len

    def copy_row(self, src: SlotCache, src_row: int, dst_row: int, length: int) -> None:
        if (src is self and src_row == dst_row) or length <= 0:  # a row with nothing yet may have no slot in `src`
            return
        for mine, theirs in ((self.keys, src.keys), (self.values, src.values)):
            for a, b in zip(mine, theirs, strict=True):
                a[dst_row, :, :length] = b[src_row, :, :length]
