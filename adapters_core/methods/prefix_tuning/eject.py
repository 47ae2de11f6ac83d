"""eject_prefix_tuning, as a model method: replace a reparameterised prefix by the flat tensor its MLP gives.

Mixed into the adapter mixin through `PrefixTuningMethod.api`; `self` is the model (its `_host`,
`adapters_registry` and train mode). Right for GQA models too (the flat tensor has n_kv_heads*head_dim
per layer, not hidden), where AdapterHub's eject raises.
"""

from __future__ import annotations

import torch
from torch import nn

from ...configuration import ConfigUnion
from .config import PrefixTuningConfig
from .module import PrefixTuningModule
from .routing import prefixes


class EjectAPI:
    """eject_prefix_tuning."""

    def eject_prefix_tuning(self, name: str) -> None:
        """Replace a reparameterised prefix by the flat tensor its MLP produces (fewer parameters)."""
        cfg = self.adapters_registry.configs.get(name)
        if cfg is None:
            raise ValueError(f"no adapter named {name!r}")
        state = prefixes(self._host)
        if name not in state.prefix_tunings:
            raise ValueError(f"adapter {name!r} has no prefix tuning to eject")
        group = state.prefix_tunings[name]
        if all(m.flat for m in group.values()):
            return
        members = [m.replace(flat=True) if isinstance(m, PrefixTuningConfig) else m for m in cfg.methods()]
        new_cfg = members[0] if len(members) == 1 else ConfigUnion(*members)
        pcfg = next(m for m in members if isinstance(m, PrefixTuningConfig))
        ejected: dict[str, PrefixTuningModule] = {}
        for key, old in group.items():
            with torch.no_grad():
                flat = old.flat_weights().detach().clone()
            new = PrefixTuningModule(old.n_layers, old.n_kv_heads, old.head_dim, self._host.hidden, pcfg)
            new.control_trans = nn.Parameter(flat.to(device=flat.device, dtype=flat.dtype))
            new.train(self.training)
            ejected[key] = new
        state.prefix_tunings[name] = nn.ModuleDict(ejected)
        self.adapters_registry.configs[name] = new_cfg
