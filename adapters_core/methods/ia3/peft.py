"""PEFT (IA)^3 folders -> the AdapterHub layout this library loads.

PEFT names the vectors `<module path>.ia3_l.weight` (out x 1 for output scaling); input scaling on a
feed-forward module has no AdapterHub equivalent and is refused.
"""

from __future__ import annotations

from ...formats import AdapterFiles, PeftFiles
from ..base import Host
from ..lora.peft import (
    PEFT_ADAPTER_NAME,
    adapter_key,
    check_complete,
    collect,
    covered_locations,
    target_paths,
)
from .config import IA3Config


def ia3_from_peft(host: Host, peft: PeftFiles) -> AdapterFiles:
    base_prefix = host.base.base_model_prefix
    sites = target_paths(host)
    ff = set(peft.config.get("feedforward_modules") or [])
    found = collect(peft, sites, base_prefix, ("ia3_l.weight", "ia3_l"))
    name = PEFT_ADAPTER_NAME
    state = {}
    for path, tensors in found.items():
        value = next(iter(tensors.values()))
        if path.split(".")[-1] in ff or value.shape[0] == 1 and value.dim() == 2 and value.shape[1] > 1:
            raise ValueError(f"PEFT (IA)^3 input scaling on feed-forward module {path!r} is not supported")
        state[adapter_key(base_prefix, path, name, "lora_B")] = value.reshape(-1, 1)
    config = IA3Config(**covered_locations(found, sites, host.n_layers))
    check_complete(config, found, sites)
    return AdapterFiles(config, name, {"config": config.to_dict(), "name": name, "peft_type": "IA3"}, state)
