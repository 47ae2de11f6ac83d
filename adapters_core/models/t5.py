"""T5 family (T5, MT5, Flan-T5's gated FFN): pre-LN (RMS) blocks, encoder then decoder.

AdapterHub's places: bottlenecks on each sublayer's dropout output (`layer.i.adapters`), the decoder's
cross-attention one at `layer.1` (`cross_adapter`); LoRA/IA3 on q, k, v of self- and cross-attention
and the FFN's wi (wi_1 when gated) and wo; prefixes at encoder self-attention (encoder_prefix), decoder
self-attention (self_prefix) and cross-attention (cross_prefix).
"""

from .base import ArchSpec, BottleneckSite, LayerGroup, LoRASite, PrefixSite, register


def _bottleneck(location: str, sub: int) -> BottleneckSite:
    return BottleneckSite(location, sublayer=f"layer.{sub}.dropout", container=f"layer.{sub}", post_ln=False,
                          residual_ln=f"layer.{sub}.layer_norm")


def _attention(path: str) -> tuple[LoRASite, ...]:
    return tuple(LoRASite(f"{path}.{m}", "selfattn", (m,)) for m in ("q", "k", "v"))


def _ffn(sub: int) -> tuple[LoRASite, ...]:
    ffn = f"layer.{sub}.DenseReluDense"
    return LoRASite(f"{ffn}.wi_1|{ffn}.wi", "intermediate"), LoRASite(f"{ffn}.wo", "output")


_BIAS = "layer.0.SelfAttention"

T5 = register(
    ArchSpec(
        model_types=("t5", "mt5"),
        adapter_model_class="T5AdapterModel",
        groups=(
            LayerGroup("encoder.block", (
                _bottleneck("mh_adapter", 0), _bottleneck("output_adapter", 1),
                *_attention("layer.0.SelfAttention"), *_ffn(1),
                PrefixSite("layer.0.SelfAttention", "encoder", relative_bias=_BIAS),
            )),
            LayerGroup("decoder.block", (
                _bottleneck("mh_adapter", 0), _bottleneck("cross_adapter", 1), _bottleneck("output_adapter", 2),
                *_attention("layer.0.SelfAttention"), *_attention("layer.1.EncDecAttention"), *_ffn(2),
                PrefixSite("layer.0.SelfAttention", "self", relative_bias=_BIAS),
                PrefixSite("layer.1.EncDecAttention", "cross"),
            )),
        ),
        entries=("encoder",),
    )
)
