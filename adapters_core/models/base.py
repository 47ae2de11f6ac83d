"""Architecture descriptions: where each adapter method attaches in a Hugging Face model.

An architecture file only declares module paths (`ArchSpec`); `models/wiring.py` turns a spec into forward
hooks. Paths are relative to one transformer layer unless noted.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BottleneckSite:
    """Where a bottleneck location ("mh_adapter" or "output_adapter") reads h and x and writes its result.

    post_ln (BERT): `sublayer` computes LN(dropout(dense(.)) + x); h is the output of `sublayer.h_module`,
    x the sublayer's argument `residual_arg`, and the LN is `sublayer.layer_norm`.
    pre_ln (GPT-2, Llama): h is the output of `sublayer` (first element of a tuple), x the input of the
    layer's `residual_ln` module, and the layer itself adds x afterwards.
    `container` is where the `adapters` ModuleDict hangs (AdapterHub's key path).
    """

    location: str
    sublayer: str
    container: str
    post_ln: bool
    h_module: str = "dropout"
    layer_norm: str = "LayerNorm"
    residual_arg: int = 1
    residual_kwarg: str = "input_tensor"
    residual_ln: str = ""


@dataclass(frozen=True)
class LoRASite:
    """A linear layer LoRA/IA3 can wrap: `location` is selfattn, intermediate or output.

    `attn_keys` lists the attention matrices the layer computes: ("q",) for a plain projection,
    ("q", "k", "v") for a fused one whose output is split in equal thirds.
    """

    module: str
    location: str
    attn_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchSpec:
    """Everything adapters_core needs to know about one model family."""

    model_types: tuple[str, ...]
    layers: str
    attention: str
    bottleneck_sites: tuple[BottleneckSite, ...]
    lora_sites: tuple[LoRASite, ...]
    adapter_model_class: str

    def n_heads(self, config: object) -> int:
        return int(config.num_attention_heads)

    def n_kv_heads(self, config: object) -> int:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    def head_dim(self, config: object) -> int:
        return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec
    return spec


def spec_for(model_type: str) -> ArchSpec:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ValueError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(_REGISTRY))}"
        ) from None


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_path(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split(".") if path else ():
        module = getattr(module, part)
    return module
