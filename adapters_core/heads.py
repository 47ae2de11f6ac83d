"""XAdapterModel classes: a backbone plus named prediction heads, and AutoAdapterModel."""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import AutoModel, PreTrainedModel

from .model import AdapterModelMixin, wire


class AdapterModel(AdapterModelMixin, nn.Module):
    """A base model (under its usual prefix, e.g. `bert`) with adapters and a dict of heads."""

    def __init__(self, base: PreTrainedModel):
        super().__init__()
        self.base_model_prefix = base.base_model_prefix
        self.add_module(base.base_model_prefix, base)
        self.config = base.config
        self.heads = nn.ModuleDict()
        wire(self)

    @property
    def base_model(self) -> PreTrainedModel:
        return getattr(self, self.base_model_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> AdapterModel:
        return cls(AutoModel.from_pretrained(path, **kwargs))


class AutoAdapterModel:
    """Builds the right AdapterModel for a checkpoint's model_type."""

    @staticmethod
    def from_pretrained(path: str | os.PathLike[str], **kwargs: Any) -> AdapterModel:
        return AdapterModel.from_pretrained(path, **kwargs)

    @staticmethod
    def from_config(config: Any, **kwargs: Any) -> AdapterModel:
        return AdapterModel(AutoModel.from_config(config, **kwargs))
