"""Data: prompt sets (YAML / JSONL), chat-data JSONL files, contrast pairs and the shipped English EM
data with their design / held-out splits. The folder also holds package data (questions, judge
prompts, the SAE registry, the prebuilt organism).

May import: models and the core.
"""
