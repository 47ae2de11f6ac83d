"""BART (post-LN) and mBART (pre-LN): encoder then decoder layers with functional dropout.

AdapterHub's places: `attention_adapters` after self-attention, `cross_attention_adapters` after the
decoder's cross-attention (`cross_adapter`), `output_adapters` after the FFN, each given the layer's own
LayerNorm on BART and none on mBART; LoRA/IA3 on q/k/v_proj of self- and cross-attention, fc1
(intermediate) and fc2 (output); prefixes at encoder self-attention, decoder self-attention and
cross-attention.
"""

from .base import ArchSpec, BottleneckSite, LayerGroup, LoRASite, PrefixSite, register

_PLACES = (  # (location, sublayer whose argument is x, container, the LayerNorm after (BART) / before (mBART))
    ("mh_adapter", "self_attn", "attention_adapters", "self_attn_layer_norm"),
    ("cross_adapter", "encoder_attn", "cross_attention_adapters", "encoder_attn_layer_norm"),
    ("output_adapter", "fc1", "output_adapters", "final_layer_norm"),
)
_H = {"self_attn": "self_attn", "encoder_attn": "encoder_attn", "fc1": "fc2"}


def _sites(decoder: bool, post_ln: bool) -> tuple:
    places = [p for p in _PLACES if decoder or p[0] != "cross_adapter"]
    if post_ln:
        bottlenecks = [BottleneckSite(loc, sublayer=sub, container=box, post_ln=True, h_module="", layer_ln=ln,
                                      residual_arg=0, residual_kwarg="hidden_states")
                       for loc, sub, box, ln in places]
    else:
        bottlenecks = [BottleneckSite(loc, sublayer=_H[sub], container=box, post_ln=False, residual_ln=ln)
                       for loc, sub, box, ln in places]
    attentions = ("self_attn", "encoder_attn") if decoder else ("self_attn",)
    loras = [LoRASite(f"{a}.{m}_proj", "selfattn", (m,)) for a in attentions for m in ("q", "k", "v")]
    prefixes = [PrefixSite("self_attn", "self" if decoder else "encoder")]
    if decoder:
        prefixes.append(PrefixSite("encoder_attn", "cross"))
    return (*bottlenecks, *loras, LoRASite("fc1", "intermediate"), LoRASite("fc2", "output"), *prefixes)


def _spec(model_types: tuple[str, ...], adapter_model_class: str, post_ln: bool) -> ArchSpec:
    return ArchSpec(
        model_types=model_types,
        adapter_model_class=adapter_model_class,
        groups=(LayerGroup("encoder.layers", _sites(False, post_ln)), LayerGroup("decoder.layers", _sites(True, post_ln))),
        entries=("encoder",),
    )


BART = register(_spec(("bart",), "BartAdapterModel", post_ln=True))
MBART = register(_spec(("mbart",), "MBartAdapterModel", post_ln=False))
