"""Checks on a staged upload before anything is stored: file set, safetensors structure, configs, backbone fit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from adapters_core import AdapterConfigBase, FusionInfo, saved_fusion_names
from adapters_core.formats import FUSION_CONFIG, FUSION_WEIGHTS
from server.errors import UploadRejected
from server.registry.head_check import check_head_config
from server.registry.jsonsafe import MAX_CONFIG_NUMBER, load_json
from server.registry.lm_head import DROPPED, BackboneHead, settle_lm_head
from server.registry.peft_check import check_target_modules
from server.registry.safetensors_check import TensorEntry, read_safetensors_header
from server.registry.store import Upload, VersionMeta
from server.registry.weights_check import check_weight_values

WEIGHT_FILES = ("adapter.safetensors", "adapter_model.safetensors")
FUSION_FILES = frozenset({FUSION_CONFIG, FUSION_WEIGHTS})

# an adapter name as the uploader sees it -> its current version and folder (None: no such adapter)
MemberLookup = Callable[[str], tuple[VersionMeta, Path] | None]


class Inspector(Protocol):
    """The backbone-side validation (server.execution.engine.Engine provides it)."""

    hidden_size: int
    lm_head: BackboneHead | None  # a causal LM backbone's LM head in its files (server.registry.lm_head)

    def inspect(self, folder: Path) -> Upload: ...

    def inspect_fusion(self, folder: Path, adapter_dirs: Sequence[Path]) -> FusionInfo: ...


def _json_object(path: Path) -> dict[str, Any]:
    """A config file's JSON object: bounded nesting, finite numbers within +-MAX_CONFIG_NUMBER."""
    try:
        data = load_json(path.read_bytes(), path.name, MAX_CONFIG_NUMBER)
    except ValueError as exc:
        raise UploadRejected(422, "invalid-config", str(exc)) from None
    if not isinstance(data, dict):
        raise UploadRejected(422, "invalid-config", f"{path.name} must hold a JSON object")
    return data


def _header(path: Path) -> dict[str, TensorEntry]:
    try:
        return read_safetensors_header(path)
    except ValueError as exc:
        raise UploadRejected(422, "invalid-weights", str(exc)) from None


def _check_values(path: Path, entries: dict[str, TensorEntry]) -> None:
    """Every weight finite and within MAX_ABS_WEIGHT (server.registry.weights_check)."""
    try:
        check_weight_values(path, entries)
    except ValueError as exc:
        raise UploadRejected(422, "invalid-weights", str(exc)) from None


def unknown_config_keys(config: dict[str, Any]) -> list[str]:
    """Warnings for keys of an AdapterHub `config` that the library does not know (it keeps and ignores them)."""
    try:
        parsed = AdapterConfigBase.from_dict(config["config"], strict=False)
    except (ValueError, TypeError, KeyError):
        return []  # check_backbone reports the config itself
    unknown = sorted({*parsed.extra, *(k for m in parsed.methods() for k in m.extra)})
    return [f"adapter_config.json: unknown config key(s) kept but not used: {', '.join(unknown)}"] if unknown else []


def check_files(folder: Path) -> list[str]:
    """The folder must be one AdapterHub or PEFT adapter (optionally with a head) in safetensors; returns
    warnings for what is accepted but not used. Cheap checks run first: the configs' sizes are bounded and
    checked against the tensors' shapes before any value is read or any module is built."""
    present = {p.name for p in folder.iterdir()}
    if "adapter_config.json" not in present:
        raise UploadRejected(422, "missing-file", "adapter_config.json is missing")
    weights = [w for w in WEIGHT_FILES if w in present]
    if not weights:
        raise UploadRejected(422, "missing-file", "no weights: expected adapter.safetensors (AdapterHub) or adapter_model.safetensors (PEFT)")
    if len(weights) > 1:
        raise UploadRejected(422, "bad-file", "both adapter.safetensors and adapter_model.safetensors given; send one adapter")
    if ("head_config.json" in present) != ("model_head.safetensors" in present):
        raise UploadRejected(422, "missing-file", "a head needs both head_config.json and model_head.safetensors")
    headers = {name: _header(folder / name) for name in (*weights, "model_head.safetensors") if name in present}
    config = _json_object(folder / "adapter_config.json")
    if "head_config.json" in present:
        head = headers["model_head.safetensors"]
        check_head_config(_json_object(folder / "head_config.json"), {k: e.shape for k, e in head.items()})
    if not config.get("peft_type") and "config" not in config:
        raise UploadRejected(422, "invalid-config", "adapter_config.json has neither AdapterHub's `config` nor PEFT's `peft_type`")
    for name, entries in headers.items():
        _check_values(folder / name, entries)
    if config.get("peft_type"):
        return check_target_modules(config, list(headers[weights[0]]))
    return unknown_config_keys(config)


def check_backbone(folder: Path, inspector: Inspector) -> Upload:
    """Hidden size from the config, then the library's full check of every key's shape and the method config."""
    _check_hidden(_json_object(folder / "adapter_config.json"), "adapter_config.json", inspector)
    try:
        return inspector.inspect(folder)
    except (ValueError, KeyError, TypeError) as exc:
        raise UploadRejected(422, "incompatible-adapter", f"the adapter does not fit this backbone: {exc}") from None


def _check_hidden(config: dict[str, Any], name: str, inspector: Inspector) -> None:
    hidden = config.get("hidden_size")
    if isinstance(hidden, int) and hidden != inspector.hidden_size:
        raise UploadRejected(
            422, "incompatible-adapter",
            f"{name} says hidden_size {hidden}, but this server's backbone has hidden size {inspector.hidden_size}",
        )


def validate_fusion(folder: Path, inspector: Inspector, member: MemberLookup) -> Upload:
    """An AdapterFusion over adapters this tenant already has: its files, the adapters it names (bottleneck
    adapters, pinned to their current versions), then every key and shape against them on the meta model."""
    present = {p.name for p in folder.iterdir()}
    others = sorted(present - FUSION_FILES)
    if others:
        raise UploadRejected(422, "bad-file", f"an AdapterFusion upload holds only {FUSION_CONFIG} and {FUSION_WEIGHTS}; "
                           f"upload {', '.join(others)} as an adapter of its own")
    if FUSION_WEIGHTS not in present:
        raise UploadRejected(422, "missing-file", f"{FUSION_WEIGHTS} is missing")
    _check_values(folder / FUSION_WEIGHTS, _header(folder / FUSION_WEIGHTS))
    config = _json_object(folder / FUSION_CONFIG)
    _check_hidden(config, FUSION_CONFIG, inspector)
    try:
        names = saved_fusion_names(config)
    except ValueError as exc:
        raise UploadRejected(422, "invalid-config", str(exc)) from None
    if len(names) < 2 or len(set(names)) != len(names):
        raise UploadRejected(422, "invalid-config", f"{FUSION_CONFIG}: a fusion fuses two or more different adapters, got {list(names)}")
    found: list[tuple[VersionMeta, Path]] = []
    for name in names:
        hit = member(name)
        if hit is None:
            raise UploadRejected(422, "invalid-fusion", f"the fusion fuses {name!r}, but there is no adapter of that name here; upload it first")
        if hit[0].methods != ("bottleneck",):
            raise UploadRejected(422, "invalid-fusion", f"the fusion fuses {name!r}, a {hit[0].method} adapter; AdapterFusion fuses bottleneck adapters only")
        found.append(hit)
    try:
        info = inspector.inspect_fusion(folder, [path for _, path in found])
    except (ValueError, KeyError, TypeError) as exc:
        raise UploadRejected(422, "incompatible-adapter", f"the fusion does not fit these adapters on this backbone: {exc}") from None
    fuses = [{"tenant": m.tenant, "name": m.name, "version": m.version, "internal": m.internal} for m, _ in found]
    return Upload(method="fusion", methods=("fusion",), has_head=False, nbytes=int(info.nbytes), extra={"fuses": fuses})


def validate_upload(folder: Path, inspector: Inspector, member: MemberLookup | None = None) -> Upload:
    """All checks, in order; raises UploadRejected (4xx) naming the problem. A folder holding a fusion config
    is an AdapterFusion, checked against the adapters `member` finds. An LM head equal to the backbone's is
    removed from the folder first (recorded as extra["lm_head"] = "backbone"); any other LM head is refused."""
    if (folder / FUSION_CONFIG).exists():
        if member is None:
            raise UploadRejected(422, "bad-file", f"{FUSION_CONFIG} cannot be uploaded here")
        return validate_fusion(folder, inspector, member)
    lm_head = settle_lm_head(folder, inspector.lm_head)
    warnings = list(check_files(folder))
    upload = check_backbone(folder, inspector)
    extra = dict(upload.extra)
    if lm_head is not None:
        extra["lm_head"] = lm_head
        warnings.append(DROPPED)
    if warnings:
        extra["warnings"] = warnings
    return dataclasses.replace(upload, extra=extra) if extra != upload.extra else upload
