"""AdapterFusion: attention over the outputs of several bottleneck adapters at one location.

Parameter names (query, key, value) follow AdapterHub so fusion files load. The temperature schedule
only matters in training; in eval mode T stays at its current value.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import AdapterFusionConfig


def _init_bert(m: nn.Linear) -> None:
    with torch.no_grad():
        m.weight.normal_(0.0, 0.02)
        if m.bias is not None:
            m.bias.zero_()


class FusionLayer(nn.Module):
    """softmax(q(query) . k(up_i)) weighted sum of v(up_i), plus the residual."""

    def __init__(self, config: AdapterFusionConfig, hidden: int, dropout: float):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(dropout)
        if not (config.query or config.key or config.value):
            self.dense = nn.Linear(hidden, 1)
        if config.query:
            self.query = nn.Linear(hidden, hidden)
            _init_bert(self.query)
        if config.key:
            self.key = nn.Linear(hidden, hidden)
            _init_bert(self.key)
        if config.value:
            self.value = nn.Linear(hidden, hidden, bias=False)
            _init_bert(self.value)
            if config.value_initialized:
                with torch.no_grad():
                    self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.T = 50.0 if config.temperature else 1.0
        self.reduction = self.T / 1000.0

    def forward(self, query: torch.Tensor, ups: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """query, residual: [B, T, H]; ups: [B, T, n_adapters, H]."""
        cfg = self.config
        value = ups
        if cfg.residual_before:
            value = value + residual[:, :, None, :]
        q = self.query(query) if cfg.query else query
        k = self.key(ups) if cfg.key else ups
        v = self.value(value) if cfg.value and cfg.value_before_softmax else value
        scores = torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)).squeeze(2)
        probs = torch.softmax(self.dropout(scores) / self.T, dim=-1)
        if self.training:
            self.T = max(self.T - self.reduction, 1.0)
        context = torch.matmul(probs.unsqueeze(2), v).squeeze(2)
        if cfg.value and not cfg.value_before_softmax:
            context = self.value(context)
        if not cfg.residual_before:
            context = context + residual
        return context
