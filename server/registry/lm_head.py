"""AdapterHub's LM head beside an LM adapter: recognised, compared with the backbone's, never stored twice.

`save_adapter(..., with_head=True)` in AdapterHub on a causal LM writes the model's LM head beside the adapter:
head_config.json and model_head.safetensors (pytorch_model_head.bin without use_safetensors: refused by
server.registry.intake, nothing uploaded is ever unpickled). An XAdapterModel writes a flexible `causal_lm` head,
one tensor `heads.<name>.0.weight`; an init()'d XForCausalLM its static head, `lm_head.weight`, with
`"config": null` and the model class. With tied embeddings the tensor is a copy of the input embedding:
SmolLM2-135M's is 49152 x 576 float32, 113 MB, more than the default upload limit.

The server generates with the backbone's LM head only (server.execution.generator), so on a causal LM backbone:
- an LM head whose values equal the backbone's LM head is dropped from the staged upload and the version records
  `"lm_head": "backbone"`: nothing is stored or loaded twice. Values are compared by sha256 over their float32
  bytes (bf16 and f16 widen to float32 exactly); the backbone's is read from its safetensors files once, on
  first use, on the upload's worker thread;
- any other LM head (other values, another shape, extra layers, a bias) is refused with a 422 that says why:
  serving it would take per-row LM heads in the decode step.
The LM head's file has a byte budget of its own, `BackboneHead.allowance` (a float32 copy of the backbone's
projection and a bias, plus header room), so it may exceed ADAPTERSERVE_MAX_UPLOAD_MB while every other file
keeps that limit. Like every part it is streamed to disk, and it is read in 4 MiB chunks.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.errors import UploadRejected
from server.registry.intake import HEAD_WEIGHTS, ByteBudget
from server.registry.jsonsafe import MAX_CONFIG_NUMBER, load_json
from server.registry.safetensors_check import TensorEntry, read_safetensors_header

HEAD_CONFIG = "head_config.json"
HEADER_ROOM = 64 * 1024  # a safetensors header of one tensor and AdapterHub's metadata, generously
STATIC_LM_CLASSES = ("ForCausalLM", "LMHeadModel")
STATIC_KEY = "lm_head.weight"
BACKBONE = "backbone"  # what meta.json's extra["lm_head"] says of a head that was the backbone's
DROPPED = ("head_config.json, model_head.safetensors: the LM head equals this backbone's LM head; it is not stored "
           "(generation uses the backbone's)")
_CHUNK_BYTES = 4 << 20
_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_MIB = 1024 * 1024


def fingerprint(path: Path, entry: TensorEntry) -> str:
    """sha256 over the tensor's shape and its values as little-endian float32, read in 4 MiB chunks; equal for
    equal values whichever of float32, bfloat16 and float16 they are stored in. ValueError otherwise."""
    dtype = _FLOATS.get(entry.dtype)
    if dtype is None:
        raise ValueError(f"{path.name}: tensor is {entry.dtype}; an LM head is float32, bfloat16 or float16")
    digest = hashlib.sha256(repr(tuple(entry.shape)).encode())
    step = _CHUNK_BYTES - _CHUNK_BYTES % entry.itemsize
    with path.open("rb") as f:
        f.seek(entry.start)
        left = entry.end - entry.start
        while left:
            raw = f.read(min(step, left))
            if not raw:
                raise ValueError(f"{path.name}: the LM head is cut short")
            left -= len(raw)
            if dtype is not torch.float32:
                raw = torch.frombuffer(bytearray(raw), dtype=dtype).to(torch.float32).numpy().tobytes()
            digest.update(raw)
    return digest.hexdigest()


class BackboneHead:
    """The backbone's LM head projection [vocab, hidden] as its safetensors files hold it (the input embedding when
    the embeddings are tied, else `lm_head.weight`): the file and key (None when the files do not hold it: then no
    uploaded LM head can be compared and each is refused), and its fingerprint, read once on first use."""

    def __init__(self, shape: tuple[int, ...], path: Path | None = None, key: str | None = None) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.path = path
        self.key = key
        self._lock = threading.Lock()
        self._fingerprint: str | None = None

    @property
    def allowance(self) -> int:
        """Bytes model_head.safetensors may hold: a float32 projection of this shape and its bias, and header room."""
        rows = self.shape[0] if self.shape else 0
        cols = self.shape[1] if len(self.shape) > 1 else 0
        return 4 * rows * (cols + 1) + HEADER_ROOM

    def budget(self, max_upload_bytes: int) -> ByteBudget:
        """The byte budget of an LM head file in one upload."""
        return ByteBudget(self.allowance, detail=(
            f"model_head.safetensors exceeds {self.allowance / _MIB:.1f} MiB, the size of a float32 copy of this "
            f"backbone's LM head (the most an LM head file may hold; every other file counts against the upload "
            f"limit of {max_upload_bytes / _MIB:g} MiB)"))

    def fingerprint(self) -> str:
        """The projection's fingerprint (see `fingerprint`), read from the backbone's file on first use: on the
        caller's thread, an upload's worker thread, never the event loop."""
        with self._lock:
            if self._fingerprint is None:
                if self.path is None or self.key is None:
                    raise UploadRejected(
                        422, "lm-head-unverifiable",
                        "head_config.json, model_head.safetensors: this backbone's safetensors files do not hold its LM "
                        "head, so an uploaded LM head cannot be compared with it; upload the adapter without its head",
                    )
                self._fingerprint = fingerprint(self.path, read_safetensors_header(self.path)[self.key])
            return self._fingerprint


@dataclass(frozen=True)
class LMHeadUpload:
    """An upload's head that head_config.json describes as a causal LM head."""

    static: bool  # an XForCausalLM's `lm_head` ("config": null) rather than a flexible causal_lm head
    config: dict[str, Any] = field(default_factory=dict)  # the flexible head's "config"


def lm_head_in(folder: Path) -> LMHeadUpload | None:
    """The staged upload's head if head_config.json describes a causal LM head: AdapterHub's flexible `causal_lm`
    head, or the static head of an XForCausalLM / XLMHeadModel. None for no head (or half of one), another kind
    of head, or a head_config.json that is not a JSON object (validation reports those)."""
    path = folder / HEAD_CONFIG
    if not path.is_file() or not (folder / HEAD_WEIGHTS).is_file():
        return None
    try:
        data = load_json(path.read_bytes(), path.name, MAX_CONFIG_NUMBER)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    config = data.get("config")
    if isinstance(config, dict):
        return LMHeadUpload(False, config) if config.get("head_type") == "causal_lm" else None
    model_class = data.get("model_class")
    if config is None and isinstance(model_class, str) and model_class.endswith(STATIC_LM_CLASSES):
        return LMHeadUpload(True)
    return None


def _not_served(why: str) -> UploadRejected:
    return UploadRejected(
        422, "lm-head-differs",
        f"model_head.safetensors: this LM head is not this backbone's LM head ({why}). The server generates with the "
        "backbone's LM head only; an adapter's own LM head is not served. Upload the adapter without head_config.json "
        "and model_head.safetensors, or with the backbone's LM head",
    )


def _projection(head: LMHeadUpload, entries: dict[str, TensorEntry], backbone: BackboneHead) -> str:
    """The key of the head's one tensor, if it can be the backbone's projection; UploadRejected (422) otherwise."""
    extra = [f"layers={head.config['layers']!r}"] if head.config.get("layers") not in (None, 1) else []
    extra += [f"{k}={head.config[k]!r}" for k in ("bias", "layer_norm") if head.config.get(k)]
    if extra:
        raise _not_served(f"head_config.json gives it more than the vocabulary projection: {', '.join(extra)}")
    keys = sorted(entries)
    want = STATIC_KEY if head.static else "heads.<name>.0.weight"
    ok = keys == [STATIC_KEY] if head.static else (
        len(keys) == 1 and keys[0].startswith("heads.") and keys[0].endswith(".0.weight"))
    if not ok:
        shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        raise _not_served(f"it holds {shown}; the backbone's LM head is one tensor, {want}")
    entry = entries[keys[0]]
    if entry.shape != backbone.shape:
        raise _not_served(f"{keys[0]} has shape {list(entry.shape)}, this backbone's LM head {list(backbone.shape)}")
    if entry.dtype not in _FLOATS:
        raise _not_served(f"{keys[0]} is {entry.dtype}; compared are float32, bfloat16 and float16 heads")
    return keys[0]


def settle_lm_head(folder: Path, backbone: BackboneHead | None) -> str | None:
    """On a causal LM backbone, an upload holding an LM head: if its values equal the backbone's LM head, remove
    head_config.json and model_head.safetensors from the staged folder and return BACKBONE; any other LM head is
    an UploadRejected (422) that says why. None (nothing done) without an LM head or without a backbone head."""
    if backbone is None:
        return None
    head = lm_head_in(folder)
    if head is None:
        return None
    path = folder / HEAD_WEIGHTS
    try:
        entries = read_safetensors_header(path)
    except ValueError as exc:
        raise UploadRejected(422, "invalid-weights", str(exc)) from None
    key = _projection(head, entries, backbone)
    try:
        same = fingerprint(path, entries[key]) == backbone.fingerprint()
    except ValueError as exc:
        raise UploadRejected(422, "invalid-weights", str(exc)) from None
    if not same:
        raise _not_served(f"{key} holds other values than the backbone's LM head")
    (folder / HEAD_CONFIG).unlink()
    path.unlink()
    return BACKBONE
