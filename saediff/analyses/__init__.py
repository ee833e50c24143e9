"""Analyses: questions asked of fine-tune pairs with the methods and interventions below:
neighbourhood, susceptibility, shift overlap, phase, in-context learning and the head-to-head of
every registered method.

May import: interventions, methods, evaluation, saes, activations, data, models and the core.
"""
