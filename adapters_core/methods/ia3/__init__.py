"""(IA)^3: config.py, layer.py (the scaling vector), peft.py (PEFT folders) and method.py (the room's Method,
built on the LoRA room's targets)."""
