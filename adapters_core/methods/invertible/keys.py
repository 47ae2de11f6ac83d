"""AdapterHub's state-dict key names for invertible adapters, and translation to our module's names.

AdapterHub keeps one ``invertible_adapters`` ModuleDict on the model that owns the embeddings and saves its
entries under ``<prefix>invertible_adapters.<name>.<param>``: ``bert.`` in BertAdapterModel files (the
reference seq_bn_inv has ``bert.invertible_adapters.seq_bn_inv.F.0.weight``), no prefix from a bare BertModel
(our loader adds the base-model prefix), and ``<prefix>encoder.`` on encoder-decoders, whose invertible
adapters live on the encoder. ``<param>`` is the coupling block's own parameter name, identical in our
blocks, so translation only strips or adds the prefix, slot and name. adapter-transformers v1 files used
the slot ``invertible_lang_adapters``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

SLOT = "invertible_adapters"
LEGACY_SLOT = "invertible_lang_adapters"

#: The parameters of each coupling block type, as they appear after ``<slot>.<name>.``.
PARAM_NAMES: Mapping[str, tuple[str, ...]] = {
    kind: tuple(f"{net}.{i}.{part}" for net in nets for i in (0, 2) for part in ("weight", "bias"))
    for kind, nets in (("nice", ("F", "G")), ("glow", ("s1", "s2")))
}

_PARAM_DEPTH = 3  # "<subnet>.<index>.<weight|bias>"
_SUBNETS = frozenset({"F", "G", "s1", "s2"})


def hub_key(name: str, param: str, prefix: str = "") -> str:
    """AdapterHub's key of parameter ``param`` of adapter ``name``; ``prefix`` e.g. "bert."."""
    return f"{prefix}{SLOT}.{name}.{param}"


def parse_hub_key(key: str) -> tuple[str, str, str] | None:
    """(prefix, adapter name, param) of an invertible-adapter key (either slot), None for any other key."""
    parts = key.split(".")
    if len(parts) < _PARAM_DEPTH + 2 or parts[-_PARAM_DEPTH] not in _SUBNETS:
        return None
    for i, part in enumerate(parts[: -_PARAM_DEPTH - 1]):
        if part in (SLOT, LEGACY_SLOT):
            prefix = ".".join(parts[:i]) + "." if i else ""
            return prefix, ".".join(parts[i + 1 : -_PARAM_DEPTH]), ".".join(parts[-_PARAM_DEPTH:])
    return None


def is_invertible_key(key: str) -> bool:
    return parse_hub_key(key) is not None


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A file's tensors as (invertible-adapter keys, all other keys)."""
    inv: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        (inv if is_invertible_key(key) else rest)[key] = value
    return inv, rest


def to_module_state(state: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` among AdapterHub keys, by our block's parameter names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parsed = parse_hub_key(key)
        if parsed is not None and parsed[1] == name:
            out[parsed[2]] = value
    return out


def from_module_state(
    module_state: Mapping[str, torch.Tensor], name: str, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Our block's ``state_dict()`` as AdapterHub keys of adapter ``name`` (under ``prefix``)."""
    return {hub_key(name, param, prefix): value for param, value in module_state.items()}


__all__ = [
    "LEGACY_SLOT",
    "PARAM_NAMES",
    "SLOT",
    "from_module_state",
    "hub_key",
    "is_invertible_key",
    "parse_hub_key",
    "split_state",
    "to_module_state",
]
