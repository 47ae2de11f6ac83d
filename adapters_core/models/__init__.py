"""Architecture registry: importing this package registers every supported family."""

from . import bert, gpt2, llama  # noqa: F401
from .base import ArchSpec, BottleneckSite, LoRASite, get_path, spec_for, supported_model_types

__all__ = ["ArchSpec", "BottleneckSite", "LoRASite", "get_path", "spec_for", "supported_model_types"]
