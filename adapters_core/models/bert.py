"""BERT family (BERT, RoBERTa, XLM-RoBERTa; MiniLM is BERT): post-LN layers."""

from .base import ArchSpec, BottleneckSite, LoRASite, register

BERT = register(
    ArchSpec(
        model_types=("bert", "roberta", "xlm-roberta"),
        layers="encoder.layer",
        attention="attention.self",
        sites=(
            BottleneckSite("mh_adapter", sublayer="attention.output", container="attention.output", post_ln=True),
            BottleneckSite("output_adapter", sublayer="output", container="output", post_ln=True),
            LoRASite("attention.self.query", "selfattn", ("q",)),
            LoRASite("attention.self.key", "selfattn", ("k",)),
            LoRASite("attention.self.value", "selfattn", ("v",)),
            LoRASite("attention.output.dense", "selfattn", ("o",)),
            LoRASite("intermediate.dense", "intermediate"),
            LoRASite("output.dense", "output"),
        ),
        adapter_model_class="BertAdapterModel",
    )
)
