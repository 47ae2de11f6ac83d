"""Built-in backbones by name: `minilm` and `smollm2` (converted once at install time from PyPI's GGUF)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from server.execution.builtin_models import is_converted
from server.settings import (
    BUILTIN_MARKER,
    Settings,
    builtin_model_dir,
    default_model_path,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    folder = builtin_model_dir("smollm2")
    assert is_converted(folder), f"{folder} is not converted: `make install` runs `adapterserve convert smollm2`"
    return folder


def test_names_resolve_to_their_folders(smollm2_dir: Path) -> None:
    assert resolve_model_path("minilm") == default_model_path() != ""
    assert resolve_model_path("smollm2") == str(smollm2_dir)
    assert resolve_model_path("/some/hf/folder") == "/some/hf/folder"
    assert Settings(model_path="smollm2").model_path == str(smollm2_dir)


def test_an_unconverted_builtin_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERSERVE_MODELS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="adapterserve convert smollm2"):
        resolve_model_path("smollm2")
    with pytest.raises(ValueError, match="smollm2"):
        Settings(model_path="smollm2")


def test_the_converted_folder_is_a_plain_float32_llama(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert json.loads((smollm2_dir / BUILTIN_MARKER).read_text())["dtype"] == "float32"


@pytest.mark.slow
def test_smollm2_answers_a_chat_question_greedily(smollm2_dir: Path) -> None:
    """The converted model, wired for adapters (none active), answers as the GGUF original does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import adapters_core

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = adapters_core.init(AutoModelForCausalLM.from_pretrained(str(smollm2_dir)).eval())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == "The capital of France is Paris."
