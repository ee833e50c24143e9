"""Evaluation: is a model misaligned? Judges (the OpenAI-compatible client and a fake server for
tests), EM evaluation by generation and judging, and the judge-free pair metric.

May import: saes, activations, data, models and the core.
"""
