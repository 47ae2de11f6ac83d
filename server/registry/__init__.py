"""The durable adapter store and upload intake and validation (files and metadata; no forward pass ever runs here)."""
