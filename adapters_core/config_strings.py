"""The adapter config-string grammar: text in, (name, overrides) parts out.

A config string is a name such as ``"seq_bn"`` with optional overrides in brackets
(``"lora[r=4,alpha=16]"``, ``"seq_bn[leave_out=[0,1]]"``), several joined into a union with ``"|"``
(``"prefix_tuning[bottleneck_size=800]|par_bn"``). ``parse_config_string`` splits one into
``ConfigPart`` values; turning names into configs is ``adapters_core.configuration``'s job, so this
module knows no config and depends on the standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigPart", "parse_config_string"]

_NAME_RE = re.compile(r"([A-Za-z0-9_+\-]+)\s*(?:\[(.*)\])?", re.DOTALL)
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT_RE = re.compile(r"[+-]?\d+")
_BARE_RE = re.compile(r"[A-Za-z0-9_.+\-]+")


def _split_top(text: str, sep: str, whole: str) -> list[str]:
    """Splits ``text`` on ``sep`` outside square brackets and quotes; unbalanced brackets raise."""
    parts, depth, start, quote = [], 0, 0, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"adapter config string {whole!r}: unbalanced ']' in {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"adapter config string {whole!r}: unbalanced '[' in {text!r}")
    if quote:
        raise ValueError(f"adapter config string {whole!r}: unterminated quote in {text!r}")
    parts.append(text[start:])
    return parts


def _parse_value(text: str, whole: str) -> Any:
    """Parses an override value: int, float, bool, None, [list], 'quoted' or bare string."""
    text = text.strip()
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"adapter config string {whole!r}: bad list value {text!r}")
        inner = text[1:-1].strip()
        if not inner:
            return []
        return [_parse_value(item, whole) for item in _split_top(inner, ",", whole)]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    if text in ("None", "none", "null"):
        return None
    if _INT_RE.fullmatch(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        pass
    if not _BARE_RE.fullmatch(text):
        raise ValueError(f"adapter config string {whole!r}: cannot parse value {text!r}")
    return text


@dataclass(frozen=True)
class ConfigPart:
    """One ``name[overrides]`` part of a config string: its text, its lower-cased name and its overrides."""

    text: str
    name: str
    overrides: dict[str, Any]


def _parse_item(item: str, whole: str) -> ConfigPart:
    item = item.strip()
    match = _NAME_RE.fullmatch(item)
    if not item or match is None:
        raise ValueError(
            f"adapter config string {whole!r}: cannot parse {item!r} (expected name[key=value,...])"
        )
    name, body = match.group(1).lower(), match.group(2)
    overrides: dict[str, Any] = {}
    if body is not None and body.strip():
        for pair in _split_top(body, ",", whole):
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq or not _KEY_RE.fullmatch(key):
                raise ValueError(
                    f"adapter config string {whole!r}: bad override {pair.strip()!r} in {item!r}"
                )
            if key in overrides:
                raise ValueError(f"adapter config string {whole!r}: {key!r} given twice in {item!r}")
            overrides[key] = _parse_value(value, whole)
    return ConfigPart(item, name, overrides)


def parse_config_string(spec: str) -> list[ConfigPart]:
    """The ``|``-separated parts of a config string; a malformed string is a ValueError naming the spot."""
    if not spec.strip():
        raise ValueError("empty adapter config string")
    return [_parse_item(p, spec) for p in _split_top(spec, "|", spec)]
