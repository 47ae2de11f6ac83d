"""Prefix tuning: config.py, module.py (the prefix MLP and the per-row gathering), routing.py (which rows attend
to which prefix), attention.py (the one attention wrapper), flex.py (its BlockMask for flex_attention), rule.py
(which attention implementations carry prefixes; the others refuse), eject.py and method.py (the room's Method)."""
