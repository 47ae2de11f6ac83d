"""GPT-2: pre-LN blocks with a fused q/k/v projection (Conv1D)."""

from .base import ArchSpec, BottleneckSite, LoRASite, register

GPT2 = register(
    ArchSpec(
        model_types=("gpt2",),
        layers="h",
        attention="attn",
        sites=(
            BottleneckSite("mh_adapter", sublayer="attn", container="attention_adapters", post_ln=False,
                           residual_ln="ln_1"),
            BottleneckSite("output_adapter", sublayer="mlp", container="output_adapters", post_ln=False,
                           residual_ln="ln_2"),
            LoRASite("attn.c_attn", "selfattn", ("q", "k", "v")),
            LoRASite("mlp.c_fc", "intermediate"),
            LoRASite("mlp.c_proj", "output"),
        ),
        adapter_model_class="GPT2AdapterModel",
    )
)
