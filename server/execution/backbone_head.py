"""Where a causal LM backbone's files hold its LM head projection, so uploads can be compared with it.

The projection the generator multiplies by (server.execution.generator.lm_head_weight): the input embedding when
the embeddings are tied, else `lm_head.weight`. Only safetensors headers are read here (at startup, in the server
process, whose copy of the model may be weightless); the values are read once, when the first upload holding an LM
head is checked (server.registry.lm_head).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from server.registry.lm_head import BackboneHead
from server.registry.safetensors_check import read_safetensors_header

log = logging.getLogger("adapterserve.engine")

LM_HEAD_KEY = "lm_head.weight"


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def find_backbone_head(model_path: str, model: Any) -> BackboneHead:
    """The backbone's LM head in its safetensors files: the tied input embedding (found by its module name inside
    the base model, e.g. `model.embed_tokens.weight`, `transformer.wte.weight`) or `lm_head.weight`. Not found:
    a BackboneHead without a file (every uploaded LM head is then refused), and a warning in the log."""
    base = getattr(model, "base_model", model)
    emb = base.get_input_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", True))
    if tied:
        name = next((n for n, m in base.named_modules() if m is emb), None)
        wanted = f"{name}.weight" if name else None
    else:
        wanted = LM_HEAD_KEY
    if wanted is not None:
        for file in _weight_files(Path(model_path)):
            try:
                entries = read_safetensors_header(file)
            except (OSError, ValueError):
                continue
            for key in sorted(entries, key=len):
                if (key == wanted or key.endswith("." + wanted)) and len(entries[key].shape) == 2:
                    return BackboneHead(entries[key].shape, file, key)
    log.warning("the LM head of %s (%s) is not in its safetensors files; uploads with an LM head will be refused",
                model_path, wanted or "tied input embedding")
    return BackboneHead(tuple(emb.weight.shape))
