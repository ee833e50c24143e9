"""Interventions: change a model and measure what happens. Steering (add, clamp, project out),
the causal protocol that validates a direction against random ones, fine-tuning, the BLOCK-EM
latent penalty and its runs, cached base codes and the drift monitor.

May import: methods, evaluation, saes, activations, data, models and the core.
"""
