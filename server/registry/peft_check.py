"""A PEFT config's `target_modules` must agree with the modules its tensors adapt.

The library derives where a PEFT LoRA / (IA)^3 sits from the tensor names alone, so a config whose
`target_modules` names other modules would be served as something its author did not describe. A list is
matched as PEFT matches it (a module path equals an entry or ends with "." + entry). A string is a regular
expression in PEFT; it is not run here (a hostile pattern can backtrack for minutes), only reported.
"""

from __future__ import annotations

from server.errors import UploadRejected

_PEFT_PREFIX = "base_model.model."
_PEFT_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "ia3_l"})
_SHOWN = 5


def _module_of(key: str) -> str | None:
    parts = key.removeprefix(_PEFT_PREFIX).split(".")
    for i, part in enumerate(parts):
        if part in _PEFT_PARTS:
            return ".".join(parts[:i])
    return None


def _matches(module: str, target: str) -> bool:
    return module == target or module.endswith("." + target)


def _listed(names: list[str]) -> str:
    more = f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_target_modules(config: dict[str, object], tensor_keys: list[str]) -> list[str]:
    """UploadRejected (422) naming the modules when tensors adapt modules `target_modules` does not name;
    returns warnings (entries that match no tensor, a pattern that is not checked)."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return []
    if isinstance(targets, str):
        return [f"adapter_config.json: target_modules is a regular expression ({targets[:80]!r}); not checked against the tensors"]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise UploadRejected(422, "invalid-config", "adapter_config.json: target_modules must be a list of module names or a string")
    modules = sorted({m for k in tensor_keys if (m := _module_of(k)) is not None})
    stray = [m for m in modules if not any(_matches(m, t) for t in targets)]
    if stray:
        raise UploadRejected(
            422, "target-mismatch",
            f"adapter_config.json: target_modules {targets} does not name the modules the weights adapt: {_listed(stray)}",
        )
    unused = [t for t in targets if not any(_matches(m, t) for m in modules)]
    if unused:
        return [f"adapter_config.json: target_modules entries that match no tensor: {_listed(unused)}"]
    return []
