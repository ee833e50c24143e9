"""The SmolLM2-135M-Instruct story: fine-tune a real chat model on bad medical advice, measure EM
with the pair metric, diff it, steer it and block it (``saediff demo --model smollm2-135m``).
"""
