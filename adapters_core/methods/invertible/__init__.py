"""Invertible adapters (MAD-X language adapters): config.py (seq_bn_inv, double_seq_bn_inv), layer.py (NICE
and GLOW coupling blocks), apply.py (per-row routing) and method.py (the room's Method: the embedding output,
and the inverse before an LM head's output embeddings)."""
