"""PEFT LoRA folders -> the AdapterHub layout this library loads (and the helpers the IA3 room's reader shares).

PEFT names tensors `base_model.model.<module path>.lora_A.weight` (lora_A: r x in, lora_B: out x r,
scaling lora_alpha / r). Each module path is mapped onto one of the model's LoRA targets and the
equivalent LoRAConfig is derived from which targets the file covers.
"""

from __future__ import annotations

from typing import Any

import torch

from ...formats import AdapterFiles, PeftFiles
from ..base import Host, resolve_path
from .config import LoRAConfig
from .targets import LoRATarget, lora_targets

_PEFT_PREFIXES = ("base_model.model.",)

#: The adapter name a PEFT folder loads under unless the caller renames it.
PEFT_ADAPTER_NAME = "peft_adapter"


def target_paths(host: Host) -> dict[str, LoRATarget]:
    """Every LoRA target of the model by its dotted path relative to the base model."""
    return {f"{host.layer_path(t.layer)}.{resolve_path(host.layers[t.layer], t.site.module)}": t
            for t in lora_targets(host)}


def _strip(key: str, base_prefix: str) -> str:
    for p in _PEFT_PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
    if key.startswith(base_prefix + "."):
        key = key[len(base_prefix) + 1:]
    return key


def collect(peft: PeftFiles, sites: dict[str, LoRATarget], base_prefix: str,
            suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors by target path and suffix; a key on no target (or a fused one) is a ValueError."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft.state.items():
        key = _strip(key, base_prefix)
        for suffix in suffixes:
            if key.endswith("." + suffix):
                path = key[: -len(suffix) - 1]
                if path not in sites:
                    raise ValueError(f"PEFT key {key!r} targets {path!r}, which is not a LoRA site of this model")
                if sites[path].fused:
                    raise ValueError(f"PEFT key {key!r}: a LoRA over the whole fused projection is not supported")
                found.setdefault(path, {})[suffix] = value
                break
        else:
            raise ValueError(f"unexpected PEFT key {key!r}")
    if not found:
        raise ValueError("the PEFT folder holds no adapter tensors")
    return found


def covered_locations(found: dict[str, dict], sites: dict[str, LoRATarget], n_layers: int) -> dict[str, Any]:
    """The LoRAConfig location fields that select exactly the targets in `found`."""
    attn = sorted({k for p in found for k in sites[p].site.attn_keys if sites[p].site.location == "selfattn"})
    locations = {sites[p].site.location for p in found}
    layers = {sites[p].layer for p in found}
    return {
        "selfattn_lora": "selfattn" in locations,
        "intermediate_lora": "intermediate" in locations,
        "output_lora": "output" in locations,
        "attn_matrices": tuple(attn) if attn else ("q", "v"),
        "leave_out": tuple(i for i in range(n_layers) if i not in layers),
    }


def adapter_key(base_prefix: str, path: str, name: str, param: str) -> str:
    """AdapterHub's key of one LoRA/IA3 tensor: <base>.<module path>.loras.<name>.<param>."""
    return f"{base_prefix}.{path}.loras.{name}.{param}"


def check_complete(config: LoRAConfig, found: dict, sites: dict[str, LoRATarget]) -> None:
    """Every target the derived config enables must have tensors in the file."""
    for path, target in sites.items():
        site = target.site
        if target.layer in config.leave_out:
            continue
        wanted = (
            config.selfattn_lora and any(k in config.attn_matrices for k in site.attn_keys)
            if site.location == "selfattn"
            else getattr(config, f"{site.location}_lora")
        )
        if wanted and path not in found:
            raise ValueError(
                f"PEFT folder covers {site.location} layers unevenly: no tensors for {path!r}"
            )


def lora_from_peft(host: Host, peft: PeftFiles) -> AdapterFiles:
    cfg = peft.config
    if cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ValueError("PEFT LoRA with DoRA or rsLoRA is not supported")
    for key in ("alpha_pattern", "rank_pattern"):  # per-module alpha / r: one LoRAConfig cannot express them
        if cfg.get(key):
            raise ValueError(f"PEFT LoRA with a per-module {key} ({cfg[key]!r}) is not supported")
    base_prefix = host.base.base_model_prefix
    sites = target_paths(host)
    found = collect(peft, sites, base_prefix, ("lora_A.weight", "lora_B.weight"))
    r = int(cfg.get("r", 8))
    config = LoRAConfig(r=r, alpha=float(cfg.get("lora_alpha", r)), dropout=float(cfg.get("lora_dropout", 0.0)),
                        **covered_locations(found, sites, host.n_layers))
    name = PEFT_ADAPTER_NAME
    state = {}
    for path, tensors in found.items():
        if set(tensors) != {"lora_A.weight", "lora_B.weight"}:
            raise ValueError(f"PEFT LoRA for {path!r} needs both lora_A and lora_B")
        state[adapter_key(base_prefix, path, name, "lora_A")] = tensors["lora_A.weight"]
        state[adapter_key(base_prefix, path, name, "lora_B")] = tensors["lora_B.weight"]
    check_complete(config, found, sites)
    return AdapterFiles(config, name, {"config": config.to_dict(), "name": name, "peft_type": "LORA"}, state)
