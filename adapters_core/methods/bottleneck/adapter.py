"""One bottleneck adapter at one location: AdapterHub's module layout and its three stages.

adapter_down = [LayerNorm?, projection, activation], adapter_up = projection, where a projection is an
nn.Linear or, for Compacter, a PHM layer (anything with `linear_params()`), built by the `projection`
factory the caller passes. Parameter names match AdapterHub's so files load.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..activations import Activation
from .config import BnConfig

Projection = Callable[[int, int], nn.Module]


class BottleneckAdapter(nn.Module):
    """One adapter at one location: adapter_down = [LN?, Linear|PHM, act], adapter_up = Linear|PHM."""

    def __init__(self, hidden: int, down: int, config: BnConfig, projection: Projection = nn.Linear):
        super().__init__()
        if not isinstance(config.scaling, (int, float)) or isinstance(config.scaling, bool):
            raise ValueError(f"scaling={config.scaling!r} is not supported; use a number")
        self.config = config
        self.down_size = max(1, down)
        self.scaling = float(config.scaling)
        self.is_parallel = bool(config.is_parallel)
        layers: list[nn.Module] = []
        if config.ln_before:
            self.adapter_norm_before = nn.LayerNorm(hidden)
            layers.append(self.adapter_norm_before)
        layers.append(projection(hidden, self.down_size))
        self.adapter_up = projection(self.down_size, hidden)
        layers.append(Activation(config.non_linearity))
        self.adapter_down = nn.Sequential(*layers)
        if config.ln_after:
            self.adapter_norm_after = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(config.dropout)
        self._init_weights(config.init_weights)
        # Routing asks these per adapter, per location, per forward: compute them once (config is frozen).
        self._signature = (
            self.is_parallel, config.original_ln_before, config.residual_before_ln,
            config.adapter_residual_before_ln, config.non_linearity.lower(), self.down_size, self.scaling,
        )
        self._plain = not (config.ln_before or config.ln_after)
        self._delta_shape = (
            not config.adapter_residual_before_ln and config.original_ln_after
            and (self.is_parallel or config.residual_before_ln is True)
        )

    @property
    def down_proj(self) -> nn.Module:
        return self.adapter_down[1 if self.config.ln_before else 0]

    def _init_weights(self, scheme: str) -> None:
        linears = [m for m in (self.down_proj, self.adapter_up) if isinstance(m, nn.Linear)]
        with torch.no_grad():
            if scheme == "bert":
                for m in linears:
                    m.weight.normal_(0.0, 0.02)
                    m.bias.zero_()
            elif scheme == "mam_adapter":
                if isinstance(self.down_proj, nn.Linear):
                    nn.init.kaiming_uniform_(self.down_proj.weight, a=5**0.5)
                    self.down_proj.bias.zero_()
                if isinstance(self.adapter_up, nn.Linear):
                    self.adapter_up.weight.zero_()
                    self.adapter_up.bias.zero_()
            elif scheme == "houlsby":
                for m in linears:
                    nn.init.trunc_normal_(m.weight, 0.0, 1e-2, -2e-2, 2e-2)
                    m.bias.zero_()
            else:
                raise ValueError(f"unknown init_weights {scheme!r}")

    # AdapterHub's three stages, kept separate so stacks compose exactly like theirs.
    def pre_forward(
        self, hidden: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapter input, adapter residual)."""
        if self.is_parallel:
            return x, x
        cfg = self.config
        residual = hidden if cfg.residual_before_ln is True else None
        if cfg.original_ln_before:
            hidden = hidden + x
            if cfg.residual_before_ln == "post_add":
                residual = hidden
            if layer_norm is not None:
                hidden = layer_norm(hidden)
        if not cfg.residual_before_ln:
            residual = hidden
        return hidden, residual

    def forward(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        up = self.adapter_up(self.adapter_down(z)) * self.scaling
        return self.finish(up, residual)

    def finish(self, up: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = self.dropout(up)
        if self.is_parallel:
            return self.adapter_norm_after(out) if self.config.ln_after else out
        if self.config.adapter_residual_before_ln:
            out = out + residual
        if self.config.ln_after:
            out = self.adapter_norm_after(out)
        if not self.config.adapter_residual_before_ln:
            out = out + residual
        return out

    def pre_final(self, hidden: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
        """The value the host's residual/LN step receives (parallel adapters add the sublayer output)."""
        return hidden + h_in if self.is_parallel else hidden

    def signature(self) -> tuple:
        """Adapters with equal signatures run together in one gathered batched matmul."""
        return self._signature

    @property
    def delta_form(self) -> bool:
        """True when the host's output is just (its own value) + up(input): the common configurations.

        Then we add `up` to the sum the host computes anyway (h + x before BERT's LayerNorm, h in
        pre-LN blocks) instead of rebuilding it; equal to AdapterHub's order up to float rounding.
        """
        return self._delta_shape and self.batchable

    def delta_input(self, h: torch.Tensor, x: torch.Tensor, hx: torch.Tensor | None,
                    layer_norm: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """What the adapter reads in delta form; `hx` is h + x when the host already has it."""
        if self.is_parallel:
            return x
        if not self.config.original_ln_before:
            return h
        z = hx if hx is not None else h + x
        return layer_norm(z) if layer_norm is not None else z

    @property
    def batchable(self) -> bool:
        return self._plain and not (self.training and self.dropout.p > 0)

    def slot_parameters(self) -> list[nn.Parameter]:
        """What the batched kernel stacks (see methods.slots): both nn.Linear projections' weights and biases."""
        if type(self.down_proj) is not nn.Linear or type(self.adapter_up) is not nn.Linear:
            return []  # computed weights (Compacter): nothing resident to gather
        return [t for m in (self.down_proj, self.adapter_up) for t in (m.weight, m.bias) if t is not None]

    def linear_params(self) -> tuple[tuple[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]:
        down = self.down_proj
        up = self.adapter_up
        if type(down) is nn.Linear and type(up) is nn.Linear:
            return (down.weight, down.bias), (up.weight, up.bias)
        return _linear_params(down), _linear_params(up)


def _linear_params(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) in nn.Linear layout: a computed projection (PHM) gives them through linear_params()."""
    computed = getattr(m, "linear_params", None)
    return computed() if computed is not None else (m.weight, m.bias)
