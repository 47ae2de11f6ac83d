"""Compacter's PHM layer: a linear map whose weight is a sum of Kronecker products of small matrices.

Parameter names follow AdapterHub (W_left, W_right or W; b; phm_rule when not shared); a shared rule is
one per adapter, kept in the model's ``shared_parameters.<name>``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..bottleneck.config import BnConfig


def kron_sum(rule: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_i kron(rule[i], w[i]) for rule (n, n, n) and w (n, a, b) -> (n*a, n*b)."""
    n, ra, rb = rule.shape
    _, wa, wb = w.shape
    prod = rule[:, :, None, :, None] * w[:, None, :, None, :]
    return prod.reshape(n, ra * wa, rb * wb).sum(0)


def make_shared_phm_parameters(config: BnConfig) -> nn.ParameterDict:
    """The per-adapter parameters shared by all PHM layers (the rule when shared_phm_rule)."""
    params = nn.ParameterDict()
    n = config.phm_dim
    if config.shared_phm_rule:
        if config.factorized_phm_rule:
            params["phm_rule_left"] = nn.Parameter(torch.empty(n, n, 1), requires_grad=config.learn_phm)
            params["phm_rule_right"] = nn.Parameter(torch.empty(n, 1, n), requires_grad=config.learn_phm)
        else:
            params["phm_rule"] = nn.Parameter(torch.empty(n, n, n), requires_grad=config.learn_phm)
        for p in params.values():
            _init_rule(p, config)
    return params


def _init_rule(p: torch.Tensor, config: BnConfig) -> None:
    with torch.no_grad():
        if config.phm_c_init == "uniform":
            p.uniform_(-1, 1)
        else:
            p.normal_(0.0, config.phm_init_range)


class PHMLayer(nn.Module):
    """y = x @ H + b with H = sum_i kron(rule_i, W_i); W_i = W_left[i] @ W_right[i] when factorised.

    Parameter names follow AdapterHub (W_left, W_right or W; b; phm_rule when not shared) so files load.
    A shared rule lives in the model's `shared_parameters` and is passed in as a plain reference.
    """

    def __init__(self, in_features: int, out_features: int, config: BnConfig, shared: nn.ParameterDict | None):
        super().__init__()
        n = config.phm_dim
        if in_features % n or out_features % n:
            raise ValueError(
                f"phm_dim={n} must divide both sides of the PHM layer ({in_features} -> {out_features})"
            )
        if config.shared_W_phm:
            raise ValueError("shared_W_phm=True is not supported by adapterserve")
        self.in_features, self.out_features, self.phm_dim = in_features, out_features, n
        self.factorized_phm_W = config.factorized_phm_W
        self.factorized_phm_rule = config.factorized_phm_rule
        a, b = in_features // n, out_features // n
        if self.factorized_phm_W:
            self.W_left = nn.Parameter(torch.empty(n, a, config.phm_rank))
            self.W_right = nn.Parameter(torch.empty(n, config.phm_rank, b))
        else:
            self.W = nn.Parameter(torch.empty(n, a, b))
        if not config.shared_phm_rule:
            if self.factorized_phm_rule:
                self.phm_rule_left = nn.Parameter(torch.empty(n, n, 1), requires_grad=config.learn_phm)
                self.phm_rule_right = nn.Parameter(torch.empty(n, 1, n), requires_grad=config.learn_phm)
            else:
                self.phm_rule = nn.Parameter(torch.empty(n, n, n), requires_grad=config.learn_phm)
        self.b = nn.Parameter(torch.zeros(out_features)) if config.phm_bias else None
        object.__setattr__(self, "_shared", shared)
        self._init(config)

    def _init(self, config: BnConfig) -> None:
        with torch.no_grad():
            mats = [self.W_left, self.W_right] if self.factorized_phm_W else [self.W]
            for m in mats:
                for i in range(self.phm_dim):
                    if config.hypercomplex_nonlinearity == "normal":
                        m[i].normal_(0.0, config.phm_init_range)
                    elif config.hypercomplex_nonlinearity == "glorot-uniform":
                        nn.init.xavier_uniform_(m[i])
                    else:
                        nn.init.xavier_normal_(m[i])
            for name in ("phm_rule", "phm_rule_left", "phm_rule_right"):
                if hasattr(self, name) and isinstance(getattr(self, name), nn.Parameter):
                    _init_rule(getattr(self, name), config)

    def rule(self) -> torch.Tensor:
        source: object = self._shared if self._shared is not None and len(self._shared) else self
        if self.factorized_phm_rule:
            return torch.bmm(_get(source, "phm_rule_left"), _get(source, "phm_rule_right"))
        return _get(source, "phm_rule")

    def _matrix(self) -> torch.Tensor:
        w = torch.bmm(self.W_left, self.W_right) if self.factorized_phm_W else self.W
        return kron_sum(self.rule(), w)

    def matrix(self) -> torch.Tensor:
        """H of shape (in_features, out_features); cached in eval mode without grad until a factor changes."""
        if self.training or torch.is_grad_enabled():
            self._cached = None
            return self._matrix()
        factors = [*self.parameters(), *(self._shared.values() if self._shared is not None else ())]
        stamp = tuple((p.data_ptr(), p._version) for p in factors)
        cached = getattr(self, "_cached", None)
        if cached is None or cached[0] != stamp:
            cached = (stamp, self._matrix())
            self._cached = cached
        return cached[1]

    def linear_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) in nn.Linear layout, so PHM and plain layers share one batched kernel."""
        return self.matrix().t(), self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.matrix())
        return y + self.b if self.b is not None else y


def _get(source: object, name: str) -> torch.Tensor:
    if isinstance(source, nn.ParameterDict):
        return source[name]
    return getattr(source, name)
