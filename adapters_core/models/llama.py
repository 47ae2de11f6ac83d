"""Llama family (Llama, Mistral, Qwen2): pre-LN (RMSNorm) layers with grouped-query attention.

AdapterHub maps LoRA's "intermediate" location to mlp.down_proj and "output" to mlp.up_proj; we keep
that mapping so their files load unchanged.
"""

from .base import ArchSpec, BottleneckSite, LoRASite, register

LLAMA = register(
    ArchSpec(
        model_types=("llama", "mistral", "qwen2"),
        layers="layers",
        attention="self_attn",
        sites=(
            BottleneckSite("mh_adapter", sublayer="self_attn", container="attention_adapters", post_ln=False,
                           residual_ln="input_layernorm"),
            BottleneckSite("output_adapter", sublayer="mlp", container="output_adapters", post_ln=False,
                           residual_ln="post_attention_layernorm"),
            LoRASite("self_attn.q_proj", "selfattn", ("q",)),
            LoRASite("self_attn.k_proj", "selfattn", ("k",)),
            LoRASite("self_attn.v_proj", "selfattn", ("v",)),
            LoRASite("self_attn.o_proj", "selfattn", ("o",)),
            LoRASite("mlp.down_proj", "intermediate"),
            LoRASite("mlp.up_proj", "output"),
        ),
        adapter_model_class="LlamaAdapterModel",
    )
)
