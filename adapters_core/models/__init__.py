"""Architecture registry: importing this package registers every supported family."""

from . import bart, bert, gpt2, llama, t5  # noqa: F401
from .base import (
    ArchSpec,
    BottleneckSite,
    LayerGroup,
    LoRASite,
    PrefixSite,
    get_path,
    spec_for,
    supported_model_types,
)

__all__ = ["ArchSpec", "BottleneckSite", "LayerGroup", "LoRASite", "PrefixSite", "get_path", "spec_for", "supported_model_types"]
