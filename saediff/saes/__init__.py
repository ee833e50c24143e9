"""SAEs and crosscoders: train (TopK, BatchTopK, ReLU; single or multi-process), save and load in
SAELens folders, quality metrics, the crosscoder model and trainer, and the registry of known SAEs.

May import: activations, data, models and the core.
"""
