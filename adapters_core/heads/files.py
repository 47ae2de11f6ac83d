"""Head files: head_config.json + model_head.safetensors with AdapterHub's keys (heads.<name>.*).

Writing leaves out a causal LM projection tied to the input embeddings (it is the backbone's); reading
checks every key and shape before anything is added, and keeps such a projection tied when it equals
this backbone's embeddings.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..formats import FORMAT_VERSION, public_model_name
from .types import CausalLMHead, PredictionHead, build_head


def _tied_keys(model: nn.Module, head: PredictionHead) -> set[str]:
    if not isinstance(head, CausalLMHead):
        return set()
    emb = model.base_model.get_input_embeddings()
    return {head.output_key} if emb is not None and head.output_embeddings.weight is emb.weight else set()


def head_files(model: nn.Module, name: str, model_class: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(head_config.json dict, model_head tensors with keys heads.<name>.*) or None without such a head.

    A causal LM projection tied to the input embeddings is not written (it is the backbone's).
    """
    heads = getattr(model, "heads", None)
    if heads is None or name not in heads:
        return None
    head: PredictionHead = heads[name]
    conf = model.config
    meta = {
        "config": copy.deepcopy(head.config),
        "hidden_size": int(conf.hidden_size),
        "model_type": conf.model_type,
        "model_name": public_model_name(conf),
        "model_class": model_class,
        "name": name,
        "version": FORMAT_VERSION,
    }
    skip = _tied_keys(model, head)
    state = {f"heads.{name}.{k}": v.detach() for k, v in head.state_dict().items() if k not in skip}
    return meta, state


def load_head_files(model: nn.Module, name: str, head_config: dict[str, Any],
                    head_state: dict[str, torch.Tensor] | None) -> None:
    """Add head `name` from a head_config.json dict and its tensors; ValueError names the wrong key.

    Nothing is added unless every key and shape matches. A tied projection equal to this backbone's
    input embeddings stays tied; a different one gets its own copy (the backbone is never written).
    """
    config = head_config.get("config")
    if not isinstance(config, dict):
        raise ValueError("head_config.json needs a 'config' object (AdapterHub layout)")
    model_class = str(head_config.get("model_class") or "")
    if model_class and not model_class.endswith(("AdapterModel", "ModelWithHeads")):
        raise ValueError(f"head_config.json is for the static head class {model_class!r}, not a flexible head")
    hidden = head_config.get("hidden_size")
    if hidden is not None and int(hidden) != int(model.config.hidden_size):
        raise ValueError(f"head was made for hidden_size={hidden}, this model has {model.config.hidden_size}")
    head = build_head(name, model.config, config)
    state: dict[str, torch.Tensor] = {}
    stored: set[str] = set()
    for key, value in (head_state or {}).items():
        parts = key.split(".")
        if len(parts) < 3 or parts[0] != "heads":
            raise ValueError(f"unexpected key in model_head: {key} (expected heads.<name>.*)")
        stored.add(parts[1])
        state[".".join(parts[2:])] = value
    if len(stored) > 1:
        raise ValueError(f"model_head holds several heads: {sorted(stored)}")
    own = head.state_dict()
    tie = model._ties(head)
    tied_key = head.output_key if isinstance(head, CausalLMHead) else None
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - ({tied_key} if tie else set()))
    if unexpected or missing:
        what = f"unexpected key heads.{name}.{unexpected[0]}" if unexpected else f"missing key heads.{name}.{missing[0]}"
        raise ValueError(f"{what} for a {head.config['head_type']} head {config}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"wrong shape for heads.{name}.{key}: file has {tuple(value.shape)}, "
                             f"this model needs {tuple(own[key].shape)}")
        if not value.dtype.is_floating_point:
            raise ValueError(f"heads.{name}.{key} must be a floating-point tensor, got {value.dtype}")
    if tie and tied_key in state:
        emb = model.base_model.get_input_embeddings().weight
        tie = torch.equal(state[tied_key].to(device=emb.device, dtype=emb.dtype), emb.detach())
    with torch.no_grad():
        for key, value in state.items():
            if not (tie and key == tied_key):
                own[key].copy_(value)
    model._add_head(head, overwrite_ok=True, set_active=False, tie=tie)
    model._owned_heads.add(name)


def unfreeze_head(model: nn.Module, name: str) -> None:
    """Make head `name` trainable, except parameters it shares with the backbone (tied embeddings)."""
    heads = getattr(model, "heads", None)
    if heads is None or name not in heads:
        return
    shared = {id(p) for p in model.base_model.parameters()}
    for p in heads[name].parameters():
        if id(p) not in shared:
            p.requires_grad_(True)


def head_summary(head_config: dict[str, Any]) -> dict[str, Any]:
    """head_type, num_labels and id2label of a head_config.json dict (for listings)."""
    config = head_config.get("config") or {}
    label2id = config.get("label2id")
    return {
        "head_type": config.get("head_type"),
        "num_labels": config.get("num_labels", config.get("num_choices")),
        "id2label": {int(i): str(label) for label, i in label2id.items()} if isinstance(label2id, dict) else None,
    }
