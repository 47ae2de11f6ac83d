"""Where a bottleneck sits in a layer: the declaration an architecture file makes for this room."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BottleneckSite"]


@dataclass(frozen=True)
class BottleneckSite:
    """Where a bottleneck location ("mh_adapter" or "output_adapter") reads h and x and writes its result.

    post_ln (BERT, BART): the model computes LN(h + x); x is the sublayer's argument `residual_arg`
    (or `residual_kwarg`), h the output of `sublayer.h_module` ("" : the LN's input minus x, for models
    whose dropout is a function), and the LN is `sublayer.layer_norm` (or the layer's `layer_ln`).
    pre_ln (GPT-2, Llama, T5): h is the output of `sublayer` (first element of a tuple), x the input of
    the layer's `residual_ln` module, and the layer itself adds x afterwards.
    `container` is where the `adapters` ModuleDict hangs (AdapterHub's key path). Paths are relative to
    one transformer layer.
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
    layer_ln: str = ""
