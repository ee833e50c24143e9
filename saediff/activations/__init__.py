"""Activations: tokenize prompt sets, read residuals at chosen hooks and positions, and
stream or store them (safetensors shards, mixing buffers, paired base/fine-tune rows).

May import: models, data and the core (``errors``, ``_io``, ``console``).
"""
