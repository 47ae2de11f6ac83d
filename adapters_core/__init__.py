"""adapters_core: AdapterHub-compatible adapters for Hugging Face transformers models."""

from .composition import (
    AdapterCompositionBlock,
    Average,
    BatchSplit,
    Fuse,
    Parallel,
    Split,
    Stack,
    composition_from_json,
    composition_to_json,
    parse_composition,
    validate_composition,
)
from .configuration import (
    AdapterConfig,
    AdapterConfigBase,
    AdapterFusionConfig,
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    ConfigUnion,
    DoubleSeqBnConfig,
    DynamicAdapterFusionConfig,
    HoulsbyConfig,
    IA3Config,
    LoRAConfig,
    MAMConfig,
    ParallelConfig,
    ParBnConfig,
    PfeifferConfig,
    PrefixTuningConfig,
    SeqBnConfig,
    StaticAdapterFusionConfig,
    method_kinds,
    method_name,
)
from .context import AdapterSetup
from .head_types import MultiHeadOutput, mean_pool
from .heads import (
    AdapterModel,
    AutoAdapterModel,
    BertAdapterModel,
    GPT2AdapterModel,
    LlamaAdapterModel,
    MistralAdapterModel,
    Qwen2AdapterModel,
    RobertaAdapterModel,
    XLMRobertaAdapterModel,
)
from .model import AdapterInfo, AdapterModelMixin, init

__all__ = [
    "AdapterCompositionBlock", "Average", "BatchSplit", "Fuse", "Parallel", "Split", "Stack",
    "composition_from_json", "composition_to_json", "parse_composition", "validate_composition",
    "AdapterConfig", "AdapterConfigBase", "AdapterFusionConfig", "BnConfig", "CompacterConfig",
    "CompacterPlusPlusConfig", "ConfigUnion", "DoubleSeqBnConfig", "DynamicAdapterFusionConfig",
    "HoulsbyConfig", "IA3Config", "LoRAConfig", "MAMConfig", "ParallelConfig", "ParBnConfig",
    "PfeifferConfig", "PrefixTuningConfig", "SeqBnConfig", "StaticAdapterFusionConfig",
    "method_kinds", "method_name", "AdapterSetup", "AdapterModel", "AutoAdapterModel",
    "BertAdapterModel", "GPT2AdapterModel", "LlamaAdapterModel", "MistralAdapterModel", "Qwen2AdapterModel",
    "RobertaAdapterModel", "XLMRobertaAdapterModel", "MultiHeadOutput", "mean_pool",
    "AdapterInfo", "AdapterModelMixin", "init",
]
