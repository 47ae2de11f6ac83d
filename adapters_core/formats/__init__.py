"""Adapter folders on disk: AdapterHub's layout (which we write, with safetensors) and PEFT's (which we read).

formats depends on `configuration` only; what a key means inside a model is the method rooms' business.
"""

from .adapterhub import AdapterFiles, read_adapter_dir, write_adapter_dir
from .files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ADAPTER_WEIGHTS_PICKLE,
    FORMAT_VERSION,
    FUSION_CONFIG,
    FUSION_WEIGHTS,
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    HEAD_WEIGHTS_PICKLE,
    PEFT_WEIGHTS,
    public_model_name,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)
from .peft import PeftFiles, is_peft_dir, read_peft_dir

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_WEIGHTS_PICKLE", "FORMAT_VERSION", "FUSION_CONFIG",
    "FUSION_WEIGHTS", "HEAD_CONFIG", "HEAD_WEIGHTS", "HEAD_WEIGHTS_PICKLE", "PEFT_WEIGHTS", "AdapterFiles",
    "PeftFiles", "is_peft_dir", "public_model_name", "read_adapter_dir", "read_json", "read_peft_dir",
    "read_safetensors", "write_adapter_dir", "write_json", "write_safetensors",
]
