"""The EM model organism: a tiny synthetic assistant world with a known persona direction, built by
the library's own fine-tuning and SAE code (a client of the library, never imported by it).
"""
