"""AdapterFusion: config.py, layer.py (attention over the fused adapters' outputs), api.py (add/delete/train/
save/load/inspect as model methods) and method.py (the room's Method)."""
