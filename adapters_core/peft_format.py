"""PEFT LoRA / (IA)^3 folders -> the AdapterHub layout this library loads.

PEFT names tensors `base_model.model.<module path>.lora_A.weight` (lora_A: r x in, lora_B: out x r,
scaling lora_alpha / r) or `<module path>.ia3_l.weight` (out x 1 for output scaling). We map each module
path onto one of the model's LoRA sites and derive the equivalent LoRAConfig / IA3Config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .configuration import IA3Config, LoRAConfig
from .formats import AdapterFiles, PeftFiles
from .models.base import get_path

if TYPE_CHECKING:
    from .model import AdapterModelMixin

_PEFT_PREFIXES = ("base_model.model.",)


def _module_paths(model: AdapterModelMixin) -> dict[str, Any]:
    """Every LoRA site of the model by its dotted path relative to the base model."""
    wiring = model._wiring
    layers = wiring.spec.layers
    return {f"{layers}.{t.layer}.{t.site.module}": t for t in wiring.lora_targets}


def _strip(key: str, base_prefix: str) -> str:
    for p in _PEFT_PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
    if key.startswith(base_prefix + "."):
        key = key[len(base_prefix) + 1:]
    return key


def peft_to_adapterhub(model: AdapterModelMixin, peft: PeftFiles) -> AdapterFiles:
    cfg = peft.config
    peft_type = str(cfg.get("peft_type", "")).upper()
    base_prefix = model.adapter_base.base_model_prefix
    sites = _module_paths(model)
    name = "peft_adapter"
    if peft_type == "LORA":
        return _lora(model, peft, sites, base_prefix, name)
    if peft_type == "IA3":
        return _ia3(model, peft, sites, base_prefix, name)
    raise ValueError(f"PEFT adapter type {peft_type or '(missing)'} is not supported (LORA and IA3 are)")


def _collect(peft: PeftFiles, sites: dict[str, Any], base_prefix: str, suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft.state.items():
        key = _strip(key, base_prefix)
        for suffix in suffixes:
            if key.endswith("." + suffix):
                path = key[: -len(suffix) - 1]
                if path not in sites:
                    raise ValueError(f"PEFT key {key!r} targets {path!r}, which is not a LoRA site of this model")
                if len(sites[path].site.attn_keys) > 1:
                    raise ValueError(f"PEFT key {key!r}: a LoRA over the whole fused projection is not supported")
                found.setdefault(path, {})[suffix] = value
                break
        else:
            raise ValueError(f"unexpected PEFT key {key!r}")
    if not found:
        raise ValueError("the PEFT folder holds no adapter tensors")
    return found


def _locations(found: dict[str, dict], sites: dict[str, Any], n_layers: int) -> dict[str, Any]:
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


def _key(model: AdapterModelMixin, path: str, name: str, param: str) -> str:
    return f"{model.adapter_base.base_model_prefix}.{path}.loras.{name}.{param}"


def _lora(model: AdapterModelMixin, peft: PeftFiles, sites: dict, base_prefix: str, name: str) -> AdapterFiles:
    cfg = peft.config
    if cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ValueError("PEFT LoRA with DoRA or rsLoRA is not supported")
    for key in ("alpha_pattern", "rank_pattern"):  # per-module alpha / r: one LoRAConfig cannot express them
        if cfg.get(key):
            raise ValueError(f"PEFT LoRA with a per-module {key} ({cfg[key]!r}) is not supported")
    found = _collect(peft, sites, base_prefix, ("lora_A.weight", "lora_B.weight"))
    r = int(cfg.get("r", 8))
    config = LoRAConfig(r=r, alpha=float(cfg.get("lora_alpha", r)), dropout=float(cfg.get("lora_dropout", 0.0)),
                        **_locations(found, sites, model._wiring.n_layers))
    state = {}
    for path, tensors in found.items():
        if set(tensors) != {"lora_A.weight", "lora_B.weight"}:
            raise ValueError(f"PEFT LoRA for {path!r} needs both lora_A and lora_B")
        state[_key(model, path, name, "lora_A")] = tensors["lora_A.weight"]
        state[_key(model, path, name, "lora_B")] = tensors["lora_B.weight"]
    # every site the derived config enables must be present in the file
    _check_complete(model, config, found, sites)
    return AdapterFiles(config, name, {"config": config.to_dict(), "name": name, "peft_type": "LORA"}, state)


def _ia3(model: AdapterModelMixin, peft: PeftFiles, sites: dict, base_prefix: str, name: str) -> AdapterFiles:
    ff = set(peft.config.get("feedforward_modules") or [])
    found = _collect(peft, sites, base_prefix, ("ia3_l.weight", "ia3_l"))
    state = {}
    for path, tensors in found.items():
        value = next(iter(tensors.values()))
        if path.split(".")[-1] in ff or value.shape[0] == 1 and value.dim() == 2 and value.shape[1] > 1:
            raise ValueError(f"PEFT (IA)^3 input scaling on feed-forward module {path!r} is not supported")
        state[_key(model, path, name, "lora_B")] = value.reshape(-1, 1)
    config = IA3Config(**_locations(found, sites, model._wiring.n_layers))
    _check_complete(model, config, found, sites)
    return AdapterFiles(config, name, {"config": config.to_dict(), "name": name, "peft_type": "IA3"}, state)


def _check_complete(model: AdapterModelMixin, config: LoRAConfig, found: dict, sites: dict) -> None:
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


__all__ = ["peft_to_adapterhub", "get_path"]
