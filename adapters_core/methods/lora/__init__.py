"""LoRA: config.py, site.py (the declaration architectures make), layer.py (LinearAdapter and LoRA), apply.py
(batched math), tree.py (the Average interpreter), targets.py (where linear adapters attach, fused thirds
included), merge.py, peft.py (PEFT folders) and method.py (the room's Method)."""
