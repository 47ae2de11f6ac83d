"""Reading and writing adapter folders in AdapterHub's layout (safetensors, or a trusted local .bin).

Ours is AdapterHub's layout with safetensors: adapter_config.json + adapter.safetensors, and for a head
head_config.json + model_head.safetensors. Nothing here knows a model: key names and their aliases are
the method rooms' business.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configuration import AdapterConfigBase
from .files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ADAPTER_WEIGHTS_PICKLE,
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    HEAD_WEIGHTS_PICKLE,
    read_json,
    read_tensors,
    write_json,
    write_safetensors,
)


@dataclass(frozen=True)
class AdapterFiles:
    """One adapter folder, read: the config, the saved name, the file's metadata and tensors."""

    config: AdapterConfigBase
    name: str
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    head_config: dict[str, Any] | None = None
    head_state: dict[str, torch.Tensor] | None = None


_CONFIGS: OrderedDict[str, tuple[AdapterConfigBase, tuple[str, ...]]] = OrderedDict()
_CONFIGS_LOCK = threading.Lock()
_CONFIGS_MAX = 1024


def _parse_config(data: Any) -> tuple[AdapterConfigBase, tuple[str, ...]]:
    """The config of an adapter_config.json "config" object and the warnings parsing it gave.

    Configs are frozen values, so one parse per distinct JSON serves every later read of it: a server
    reloading an evicted adapter does not check the same config again (the checks cost about as much as
    reading the weights).
    """
    try:
        key = json.dumps(data, sort_keys=True)
    except (TypeError, ValueError):
        key = None
    with _CONFIGS_LOCK:
        hit = _CONFIGS.get(key) if key is not None else None
        if hit is not None:
            _CONFIGS.move_to_end(key)  # type: ignore[arg-type]
            return hit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = AdapterConfigBase.from_dict(data, strict=False)
    parsed = (config, tuple(str(w.message) for w in caught))
    if key is not None:
        with _CONFIGS_LOCK:
            _CONFIGS[key] = parsed
            while len(_CONFIGS) > _CONFIGS_MAX:
                _CONFIGS.popitem(last=False)
    return parsed


def read_adapter_dir(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> AdapterFiles:
    """Read an AdapterHub-layout folder; ValueError says which file or key is wrong."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a directory")
    meta = read_json(folder / ADAPTER_CONFIG)
    if "config" not in meta or "name" not in meta:
        raise ValueError(f"{ADAPTER_CONFIG} needs the keys 'config' and 'name' (AdapterHub layout)")
    config, messages = _parse_config(meta["config"])
    for message in messages:
        warnings.warn(f"{folder.name}: {message}", stacklevel=2)
    state = read_tensors(folder, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLE, allow_pickle)
    if state is None:
        raise ValueError(f"{ADAPTER_WEIGHTS} is missing in {folder}")
    head_config = head_state = None
    if (folder / HEAD_CONFIG).is_file():
        head_config = read_json(folder / HEAD_CONFIG)
        head_state = read_tensors(folder, HEAD_WEIGHTS, HEAD_WEIGHTS_PICKLE, allow_pickle)
        if head_state is None:
            raise ValueError(f"{HEAD_CONFIG} is present but {HEAD_WEIGHTS} is missing")
    return AdapterFiles(config, str(meta["name"]), meta, state, head_config, head_state)


def write_adapter_dir(
    path: str | os.PathLike[str],
    meta: dict[str, Any],
    state: dict[str, torch.Tensor],
    head_config: dict[str, Any] | None = None,
    head_state: dict[str, torch.Tensor] | None = None,
) -> None:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / ADAPTER_CONFIG, meta)
    write_safetensors(folder / ADAPTER_WEIGHTS, state)
    if head_config is not None and head_state is not None:
        write_json(folder / HEAD_CONFIG, head_config)
        write_safetensors(folder / HEAD_WEIGHTS, head_state)
