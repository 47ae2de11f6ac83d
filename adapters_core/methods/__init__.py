"""The method rooms: one package per adapter method, listed in `registry.py`.

A room holds its config classes (config.py), its tensor math, where it attaches (its site declaration
and hooks) and its file key names, and gives the model one `base.Method`. Rooms import the layers below
them (routing, context, composition, configuration, formats) and the shared modules here (base,
batching, stack_cache, activations), never an architecture file.
"""
