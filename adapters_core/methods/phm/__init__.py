"""Compacter: bottlenecks with PHM projections. config.py (compacter, compacter++), layer.py (the PHM layer and
its shared rule), method.py (the room's Method, built on the bottleneck room)."""
