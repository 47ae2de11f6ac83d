"""The adapter config-string grammar (split out of ``adapters_core.configuration``).

A config string is a name such as ``"seq_bn"`` with optional overrides in brackets
(``"lora[r=4,alpha=16]"``, ``"seq_bn[leave_out=[0,1]]"``), several joined into a union with ``"|"``
(``"prefix_tuning[bottleneck_size=800]|par_bn"``). ``_parse_config_string`` turns one into a
config object and is what ``AdapterConfigBase.load`` calls for strings. The name table
(``ADAPTER_CONFIG_NAMES``) and ``ConfigUnion`` are imported lazily inside the functions, because
``adapters_core.configuration`` imports this module.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .configuration import AdapterConfigBase

__all__: list[str] = []

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


def _parse_item(item: str, whole: str) -> AdapterConfigBase:
    """One ``name[overrides]`` part of a config string."""
    item = item.strip()
    match = _NAME_RE.fullmatch(item)
    if not item or match is None:
        raise ValueError(
            f"adapter config string {whole!r}: cannot parse {item!r} (expected name[key=value,...])"
        )
    from .configuration import ADAPTER_CONFIG_NAMES

    name, body = match.group(1).lower(), match.group(2)
    factory = ADAPTER_CONFIG_NAMES.get(name)
    if factory is None:
        raise ValueError(
            f"adapter config string {whole!r}: unknown config name {name!r}; "
            f"known: {', '.join(sorted(ADAPTER_CONFIG_NAMES))}"
        )
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
    try:
        config = factory()
        return config.replace(**overrides) if overrides else config
    except ValueError as err:
        raise ValueError(f"adapter config string {whole!r}, part {item!r}: {err}") from None


def _parse_config_string(spec: str) -> AdapterConfigBase:
    from .configuration import ConfigUnion

    if not spec.strip():
        raise ValueError("empty adapter config string")
    parts = [_parse_item(p, spec) for p in _split_top(spec, "|", spec)]
    if len(parts) == 1:
        return parts[0]
    try:
        return ConfigUnion(*parts)
    except ValueError as err:
        raise ValueError(f"adapter config string {spec!r}: {err}") from None
