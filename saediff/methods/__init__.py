"""Methods: every way of finding a candidate EM direction, one module each, registered by name in
``saediff.methods.base`` (SAE latent diff, mean differences, in-context direction, LoRA B,
crosscoder, diff-SAE, ADL, persona vector), the diff run that computes the SAE-based family, the
``Direction`` object and its export folders.

May import: evaluation, saes, activations, data, models and the core.
"""
