"""Reading and writing adapter folders: AdapterHub's layout (safetensors, or a local .bin) and PEFT's.

Ours is AdapterHub's layout with safetensors: adapter_config.json + adapter.safetensors, and for a head
head_config.json + model_head.safetensors. Nothing here knows a model; key translation lives in model.py.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .configuration import AdapterConfigBase

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_WEIGHTS_PICKLE = "pytorch_adapter.bin"
HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = "model_head.safetensors"
HEAD_WEIGHTS_PICKLE = "pytorch_model_head.bin"
PEFT_WEIGHTS = "adapter_model.safetensors"
FUSION_CONFIG = "adapter_fusion_config.json"
FUSION_WEIGHTS = "model_adapter_fusion.safetensors"
FORMAT_VERSION = "adapterserve.0.1"

# AdapterHub's .bin files repeat every prefix tensor under each layer's attention pool; keep one copy.
_PREFIX_ALIAS = ".prefix_tuning.pool.prefix_tunings."


@dataclass(frozen=True)
class AdapterFiles:
    """One adapter folder, read: the config, the saved name, the file's metadata and tensors."""

    config: AdapterConfigBase
    name: str
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    head_config: dict[str, Any] | None = None
    head_state: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class PeftFiles:
    """A PEFT adapter folder: its adapter_config.json (with peft_type) and adapter_model tensors."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path.name} is missing in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} must hold a JSON object")
    return data


def _read_tensors(folder: Path, safe: str, pickle_name: str | None, allow_pickle: bool) -> dict[str, torch.Tensor] | None:
    if (folder / safe).is_file():
        try:
            return load_file(str(folder / safe))
        except Exception as exc:  # safetensors raises several error types for corrupt files
            raise ValueError(f"{safe} could not be read as safetensors: {exc}") from None
    if pickle_name and (folder / pickle_name).is_file():
        if not allow_pickle:
            raise ValueError(
                f"{pickle_name} is a pickle file; only safetensors are accepted here "
                f"(pass allow_pickle=True for a trusted local folder)"
            )
        try:
            state = torch.load(folder / pickle_name, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError (refused or corrupt pickle), RuntimeError, EOFError, ...
            raise ValueError(f"{pickle_name} could not be read as a weights-only torch file: {exc}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{pickle_name} does not hold a state dict")
        bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{pickle_name}: entries that are not named tensors: {', '.join(bad[:5])}")
        return state
    return None


def is_peft_dir(path: str | os.PathLike[str]) -> bool:
    folder = Path(path)
    try:
        return "peft_type" in _read_json(folder / ADAPTER_CONFIG)
    except ValueError:
        return False


def read_peft_dir(path: str | os.PathLike[str]) -> PeftFiles:
    folder = Path(path)
    config = _read_json(folder / ADAPTER_CONFIG)
    state = _read_tensors(folder, PEFT_WEIGHTS, None, allow_pickle=False)
    if state is None:
        raise ValueError(f"{PEFT_WEIGHTS} is missing in {folder}")
    return PeftFiles(config, state)


def read_adapter_dir(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> AdapterFiles:
    """Read an AdapterHub-layout folder; ValueError says which file or key is wrong."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a directory")
    meta = _read_json(folder / ADAPTER_CONFIG)
    if "config" not in meta or "name" not in meta:
        raise ValueError(f"{ADAPTER_CONFIG} needs the keys 'config' and 'name' (AdapterHub layout)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = AdapterConfigBase.from_dict(meta["config"], strict=False)
    for w in caught:
        warnings.warn(f"{folder.name}: {w.message}", stacklevel=2)
    state = _read_tensors(folder, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLE, allow_pickle)
    if state is None:
        raise ValueError(f"{ADAPTER_WEIGHTS} is missing in {folder}")
    head_config = head_state = None
    if (folder / HEAD_CONFIG).is_file():
        head_config = _read_json(folder / HEAD_CONFIG)
        head_state = _read_tensors(folder, HEAD_WEIGHTS, HEAD_WEIGHTS_PICKLE, allow_pickle)
        if head_state is None:
            raise ValueError(f"{HEAD_CONFIG} is present but {HEAD_WEIGHTS} is missing")
    state = dedupe_layer_norm_aliases(dedupe_prefix_aliases(state))
    return AdapterFiles(config, str(meta["name"]), meta, state, head_config, head_state)


def dedupe_prefix_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map AdapterHub's per-layer prefix aliases onto the model-level `prefix_tuning.prefix_tunings` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _PREFIX_ALIAS in key:
            root, rest = key.split(".", 1)[0], key.split(_PREFIX_ALIAS, 1)[1]
            out.setdefault(f"{root}.prefix_tuning.prefix_tunings.{rest}", value)
        else:
            out[key] = value
    return out


def dedupe_layer_norm_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop AdapterHub's second name for a bottleneck's ln_before LayerNorm.

    With ln_before=True AdapterHub's adapter holds the LayerNorm both as `adapter_norm_before` and as
    `adapter_down.0` (the first entry of the Sequential), and it saves `model.state_dict()`, which lists
    the tensors under both names. We keep `adapter_norm_before.*` and drop an `adapter_down.0.*` entry
    that holds the very same values.
    """
    out = dict(state)
    for key, value in state.items():
        for part in ("weight", "bias"):
            suffix = f".adapter_norm_before.{part}"
            if key.endswith(suffix):
                alias = key[: -len(suffix)] + f".adapter_down.0.{part}"
                other = out.get(alias)
                if other is not None and other.shape == value.shape and torch.equal(other, value):
                    del out[alias]
    return out


def write_adapter_dir(
    path: str | os.PathLike[str],
    meta: dict[str, Any],
    state: dict[str, torch.Tensor],
    head_config: dict[str, Any] | None = None,
    head_state: dict[str, torch.Tensor] | None = None,
) -> None:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS))
    if head_config is not None and head_state is not None:
        (folder / HEAD_CONFIG).write_text(json.dumps(head_config, indent=2, sort_keys=True))
        save_file({k: v.detach().contiguous().cpu() for k, v in head_state.items()}, str(folder / HEAD_WEIGHTS))


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def read_json(path: Path) -> dict[str, Any]:
    return _read_json(path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return _read_tensors(path.parent, path.name, None, allow_pickle=False) or {}


def write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
