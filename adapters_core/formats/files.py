"""File names of AdapterHub's folder layout, the format version we write, and JSON/safetensors reading and writing.

Readers raise ValueError naming the file that is missing or broken; a pickle (`.bin`) is read only when
the caller allows it (a trusted local folder), and then with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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


def public_model_name(conf: Any) -> str:
    """The backbone's hub-style name; a local folder is reduced to its name (no machine paths in files)."""
    name = str(getattr(conf, "_name_or_path", "") or conf.model_type)
    if os.path.isabs(name):
        path = os.path.normpath(name)
        base = os.path.basename(path)
        return os.path.basename(os.path.dirname(path)) if base == "model" else base
    return name


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; ValueError when the file is missing, not JSON or not an object."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path.name} is missing in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} must hold a JSON object")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def read_tensors(folder: Path, safe: str, pickle_name: str | None, allow_pickle: bool) -> dict[str, torch.Tensor] | None:
    """The tensors of `folder/safe`, else of `folder/pickle_name` when allowed; None when neither exists."""
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


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path.parent, path.name, None, allow_pickle=False) or {}


def write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
