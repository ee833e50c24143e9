"""Models: load a Hugging Face causal LM (local folder, hub name, GGUF file, PEFT adapter), its
chat formatting and generation, the TransformerLens-named hook points, PEFT adapter IO and the
fingerprints that say which model an artifact came from.

May import: ``saediff.errors``, ``saediff._io``, ``saediff.console``.
"""
