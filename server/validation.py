"""Checks on a staged upload before anything is stored: file set, safetensors structure, configs, backbone fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from server.problems import ProblemError
from server.safetensors_check import read_safetensors_shapes
from server.store import Upload

WEIGHT_FILES = ("adapter.safetensors", "adapter_model.safetensors")


class Inspector(Protocol):
    """The backbone-side validation (server.engine.Engine provides it)."""

    hidden_size: int

    def inspect(self, folder: Path) -> Upload: ...


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProblemError(422, "invalid-config", f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProblemError(422, "invalid-config", f"{path.name} must hold a JSON object")
    return data


def check_files(folder: Path) -> None:
    """The folder must be one AdapterHub or PEFT adapter (optionally with a head) in safetensors."""
    present = {p.name for p in folder.iterdir()}
    if "adapter_config.json" not in present:
        raise ProblemError(422, "missing-file", "adapter_config.json is missing")
    weights = [w for w in WEIGHT_FILES if w in present]
    if not weights:
        raise ProblemError(422, "missing-file", "no weights: expected adapter.safetensors (AdapterHub) or adapter_model.safetensors (PEFT)")
    if len(weights) > 1:
        raise ProblemError(422, "bad-file", "both adapter.safetensors and adapter_model.safetensors given; send one adapter")
    if ("head_config.json" in present) != ("model_head.safetensors" in present):
        raise ProblemError(422, "missing-file", "a head needs both head_config.json and model_head.safetensors")
    for name in (*weights, "model_head.safetensors"):
        if name in present:
            try:
                read_safetensors_shapes(folder / name)
            except ValueError as exc:
                raise ProblemError(422, "invalid-weights", str(exc)) from None
    config = _json_object(folder / "adapter_config.json")
    if "head_config.json" in present:
        _json_object(folder / "head_config.json")
    if not config.get("peft_type") and "config" not in config:
        raise ProblemError(422, "invalid-config", "adapter_config.json has neither AdapterHub's `config` nor PEFT's `peft_type`")


def check_backbone(folder: Path, inspector: Inspector) -> Upload:
    """Hidden size from the config, then the library's full check of every key's shape and the method config."""
    config = _json_object(folder / "adapter_config.json")
    hidden = config.get("hidden_size")
    if isinstance(hidden, int) and hidden != inspector.hidden_size:
        raise ProblemError(
            422, "incompatible-adapter",
            f"adapter_config.json says hidden_size {hidden}, but this server's backbone has hidden size {inspector.hidden_size}",
        )
    try:
        return inspector.inspect(folder)
    except (ValueError, KeyError, TypeError) as exc:
        raise ProblemError(422, "incompatible-adapter", f"the adapter does not fit this backbone: {exc}") from None


def validate_upload(folder: Path, inspector: Inspector) -> Upload:
    """All checks, in order; raises ProblemError (4xx) naming the problem."""
    check_files(folder)
    return check_backbone(folder, inspector)
