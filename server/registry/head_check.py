"""Cheap checks of head_config.json against the head's tensors, before the library builds the head.

The library builds a head's modules and its label table from numbers in the config (`layers`,
`num_labels`), so `"num_labels": 100000000` or `"layers": 100000` cost minutes and gigabytes out of
proportion to the upload. Here each such number must be small and agree with the tensors actually sent,
so the cost of validating a head scales with its file's size.
"""

from __future__ import annotations

from typing import Any

from server.errors import UploadRejected

MAX_HEAD_LAYERS = 32
MAX_LABELS = 100_000
MAX_VOCAB = 1_000_000
LABEL_HEADS = frozenset({"classification", "multilabel_classification", "tagging", "question_answering"})
_HEAD = "head_config.json"


def _reject(detail: str) -> UploadRejected:
    return UploadRejected(422, "invalid-head", f"{_HEAD}: {detail}")


def _count(config: dict[str, Any], key: str, cap: int) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
        raise _reject(f"{key} must be an integer from 1 to {cap}, got {value!r}")
    return value


def _matrices(shapes: dict[str, tuple[int, ...]]) -> list[tuple[int, tuple[int, ...]]]:
    """(module index, shape) of every 2-D `heads.<name>.<index>.weight`, in module order."""
    found = []
    for key, shape in shapes.items():
        parts = key.split(".")
        if len(shape) == 2 and len(parts) == 4 and parts[0] == "heads" and parts[2].isdigit() and parts[3] == "weight":
            found.append((int(parts[2]), shape))
    return sorted(found)


def _labels(config: dict[str, Any], n: int | None) -> int | None:
    """How many labels label2id / id2label name (each must map 0..k-1 one to one); None if neither is given."""
    seen: int | None = None
    label2id, id2label = config.get("label2id"), config.get("id2label")
    if label2id is not None:
        if not isinstance(label2id, dict) or not all(isinstance(i, int) and not isinstance(i, bool) for i in label2id.values()):
            raise _reject(f"label2id must be an object of label -> id (an integer), got {type(label2id).__name__}")
        if sorted(label2id.values()) != list(range(len(label2id))):
            raise _reject(f"label2id must give the ids 0..{len(label2id) - 1} once each")
        seen = len(label2id)
    if id2label is not None:
        if not isinstance(id2label, dict) or not all(isinstance(v, str | int | float) for v in id2label.values()):
            raise _reject(f"id2label must be an object of id -> label, got {type(id2label).__name__}")
        if sorted(id2label) != sorted(str(i) for i in range(len(id2label))):
            raise _reject(f"id2label must have the keys 0..{len(id2label) - 1}")
        if seen is not None and seen != len(id2label):
            raise _reject(f"label2id names {seen} labels but id2label names {len(id2label)}")
        seen = len(id2label)
    if seen is not None and n is not None and seen != n:
        raise _reject(f"the labels name {seen} classes but num_labels is {n}")
    return seen


def check_head_config(data: object, shapes: dict[str, tuple[int, ...]]) -> None:
    """UploadRejected (422) naming the field unless the head config's sizes are sane and match `shapes`
    (the tensors of model_head.safetensors)."""
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise _reject("needs a `config` object (AdapterHub layout)")
    config: dict[str, Any] = data["config"]
    head_type = config.get("head_type")
    if not isinstance(head_type, str):
        raise _reject(f"config.head_type must be a string, got {head_type!r}")
    layers = _count(config, "layers", MAX_HEAD_LAYERS)
    num_labels = _count(config, "num_labels", MAX_LABELS)
    _count(config, "num_choices", MAX_LABELS)
    _count(config, "vocab_size", MAX_VOCAB)
    _count(config, "embedding_size", MAX_VOCAB)
    labels = _labels(config, num_labels)
    if labels is not None and labels > MAX_LABELS:
        raise _reject(f"names {labels} labels; at most {MAX_LABELS} are accepted")
    matrices = _matrices(shapes)
    if head_type == "causal_lm":
        if layers is not None and not layers - 1 <= len(matrices) <= layers:
            raise _reject(f"layers is {layers} but model_head.safetensors holds {len(matrices)} weight matrices")
        return
    if head_type not in LABEL_HEADS and head_type != "multiple_choice":
        return
    if not matrices:
        raise _reject("model_head.safetensors holds no weight matrix (heads.<name>.<index>.weight)")
    if layers is not None and layers != len(matrices):
        raise _reject(f"layers is {layers} but model_head.safetensors holds {len(matrices)} weight matrices")
    if head_type in LABEL_HEADS:
        out = matrices[-1][1][0]
        for key, n in (("num_labels", num_labels), ("label2id/id2label", labels)):
            if n is not None and n != out:
                raise _reject(f"{key} says {n} labels but the head's output layer has {out}")
