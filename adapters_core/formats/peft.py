"""Reading a PEFT adapter folder (adapter_config.json with peft_type + adapter_model.safetensors).

Only the files: mapping PEFT's module paths onto a model is the business of the rooms that read PEFT
(lora, ia3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files import ADAPTER_CONFIG, PEFT_WEIGHTS, read_json, read_tensors


@dataclass(frozen=True)
class PeftFiles:
    """A PEFT adapter folder: its adapter_config.json (with peft_type) and adapter_model tensors."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]


def is_peft_dir(path: str | os.PathLike[str]) -> bool:
    folder = Path(path)
    try:
        return "peft_type" in read_json(folder / ADAPTER_CONFIG)
    except ValueError:
        return False


def read_peft_dir(path: str | os.PathLike[str]) -> PeftFiles:
    folder = Path(path)
    config = read_json(folder / ADAPTER_CONFIG)
    state = read_tensors(folder, PEFT_WEIGHTS, None, allow_pickle=False)
    if state is None:
        raise ValueError(f"{PEFT_WEIGHTS} is missing in {folder}")
    return PeftFiles(config, state)
