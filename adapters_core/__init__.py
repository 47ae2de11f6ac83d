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
from .configuration import AdapterConfigBase, ConfigUnion, method_kinds, method_name
from .context import AdapterSetup
from .heads import (
    AdapterModel,
    AutoAdapterModel,
    BartAdapterModel,
    BertAdapterModel,
    GPT2AdapterModel,
    LlamaAdapterModel,
    MBartAdapterModel,
    MistralAdapterModel,
    MT5AdapterModel,
    MultiHeadOutput,
    Qwen2AdapterModel,
    RobertaAdapterModel,
    T5AdapterModel,
    XLMRobertaAdapterModel,
    mean_pool,
)
from .inspection import AdapterInfo
from .methods.bottleneck.config import (
    AdapterConfig,
    BnConfig,
    DoubleSeqBnConfig,
    HoulsbyConfig,
    ParallelConfig,
    ParBnConfig,
    PfeifferConfig,
    SeqBnConfig,
)
from .methods.fusion.api import FusionInfo, saved_fusion_names
from .methods.fusion.config import AdapterFusionConfig, DynamicAdapterFusionConfig, StaticAdapterFusionConfig
from .methods.ia3.config import IA3Config
from .methods.invertible.config import DoubleSeqBnInvConfig, SeqBnInvConfig
from .methods.lora.config import LoRAConfig
from .methods.mam import MAMConfig
from .methods.phm.config import CompacterConfig, CompacterPlusPlusConfig
from .methods.prefix_tuning.config import PrefixTuningConfig
from .model import AdapterModelMixin, init

__all__ = [
    "AdapterCompositionBlock", "Average", "BatchSplit", "Fuse", "Parallel", "Split", "Stack",
    "composition_from_json", "composition_to_json", "parse_composition", "validate_composition",
    "AdapterConfig", "AdapterConfigBase", "AdapterFusionConfig", "BnConfig", "CompacterConfig",
    "CompacterPlusPlusConfig", "ConfigUnion", "DoubleSeqBnConfig", "DoubleSeqBnInvConfig", "DynamicAdapterFusionConfig",
    "HoulsbyConfig", "IA3Config", "LoRAConfig", "MAMConfig", "ParallelConfig", "ParBnConfig",
    "PfeifferConfig", "PrefixTuningConfig", "SeqBnConfig", "SeqBnInvConfig", "StaticAdapterFusionConfig",
    "method_kinds", "method_name", "AdapterSetup", "AdapterModel", "AutoAdapterModel",
    "BartAdapterModel", "BertAdapterModel", "GPT2AdapterModel", "LlamaAdapterModel", "MBartAdapterModel",
    "MistralAdapterModel", "MT5AdapterModel", "Qwen2AdapterModel", "RobertaAdapterModel", "T5AdapterModel", "XLMRobertaAdapterModel", "MultiHeadOutput", "mean_pool",
    "AdapterInfo", "AdapterModelMixin", "FusionInfo", "init", "saved_fusion_names",
]
