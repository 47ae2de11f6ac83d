"""Bottleneck adapters (seq_bn, double_seq_bn, par_bn): config.py, site.py (the declaration architectures make),
adapter.py (the module), apply.py (batched math), tree.py (the Fuse/Split/Average interpreter), hooks.py
(where they attach) and method.py (the room's Method)."""
