"""Prediction heads: AdapterModel (a backbone with named heads), its per-family classes and AutoAdapterModel.

types.py holds the head modules, routing.py applies a head setup to one backbone output, files.py reads
and writes head folders, model.py the model classes.
"""

from .files import head_files, head_summary, load_head_files, unfreeze_head
from .model import (
    AdapterModel,
    AutoAdapterModel,
    BartAdapterModel,
    BertAdapterModel,
    GPT2AdapterModel,
    LlamaAdapterModel,
    MBartAdapterModel,
    MistralAdapterModel,
    MT5AdapterModel,
    Qwen2AdapterModel,
    RobertaAdapterModel,
    T5AdapterModel,
    XLMRobertaAdapterModel,
    adapter_model_class,
)
from .routing import HeadSpec
from .types import HEAD_TYPES, MultiHeadOutput, mean_pool

__all__ = [
    "AdapterModel", "AutoAdapterModel", "BartAdapterModel", "BertAdapterModel", "GPT2AdapterModel",
    "LlamaAdapterModel", "MBartAdapterModel", "MistralAdapterModel", "MT5AdapterModel", "MultiHeadOutput",
    "Qwen2AdapterModel", "RobertaAdapterModel", "T5AdapterModel", "XLMRobertaAdapterModel", "HEAD_TYPES",
    "adapter_model_class", "head_files", "head_summary", "HeadSpec", "load_head_files", "mean_pool", "unfreeze_head",
]
