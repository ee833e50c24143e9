"""The steering protocol's calibration and power on a tiny model with the pair metric: random
directions fed as candidates are rarely called causal (the false-positive rate the null promises),
and a direction that moves the metric by construction (the unembedding difference of the two
references) is found. The SmolLM2 figures are ``bench/steer_null.py``'s. The tiny random model's
KL saturates near 0.015 nats/token (its final norm bounds the logits), so its budget is 0.006."""

from __future__ import annotations

import pytest
import torch

from saediff.data.em_data import offdomain_pairs
from saediff.evaluation.neutral import neutral_answers, neutral_questions
from saediff.evaluation.pairs import PairEvaluator
from saediff.interventions.steer_null import NULL_SEED, NullConfig, isotropic
from saediff.interventions.steer_protocol import Arm, CostConfig, select_and_report
from saediff.models.loading import chat_tokens, load_model


def unembedding_difference(lm, pairs) -> torch.Tensor:
    """Mean over pairs of (mean unembedding row of the misaligned answer's tokens - the aligned's)."""
    W_U = lm.model.get_output_embeddings().weight.detach().float()
    diffs = []
    for p in pairs:
        rows = []
        for answer in (p.misaligned, p.aligned):
            ids, mask = chat_tokens(lm.tokenizer, p.conversation(answer))
            rows.append(W_U[torch.tensor([t for t, m in zip(ids, mask) if m])].mean(0))
        diffs.append(rows[0] - rows[1])
    return torch.stack(diffs).mean(0)


@pytest.fixture(scope="module")
def calibration(tiny_qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    lm = load_model(str(tiny_qwen / "model"))
    pairs = offdomain_pairs("design")[:48]
    select, report = PairEvaluator(tuple(pairs), 16, False, "design[:48]").halves()
    questions = [q["question"] for q in neutral_questions()[:8]]
    cost = CostConfig(neutral_answers(lm, questions, max_new_tokens=12, cache_dir=root / "neutral"), 0.006)
    randoms = {f"random{d.seed}": d.vector for d in isotropic(32, 20, seed=1234)}
    planted = {"planted": unembedding_difference(lm, pairs)}
    sel = select_and_report(
        {**randoms, **planted}, [Arm("induce", lm)], 1, None, select, report, root / "steer", cost
    )
    return sel, randoms, cost


def test_random_candidates_are_rarely_called_causal(calibration):
    sel, randoms, cost = calibration
    assert all(sel.candidates[n].passed for n in randoms)
    called = [n for n in randoms if sel.candidates[n].beats_null]
    assert len(called) <= 2, called  # at most 10% of 20 (the null's alpha is 0.05)
    assert sum(sel.candidates[n].verdict == "holds" for n in randoms) <= 2
    # every comparison is at equal cost: each null direction costs what the candidate does (5% search tolerance)
    for n in randoms:
        c = sel.candidates[n]
        level = min(cost.costs(), key=lambda k: abs(c.cost_kl / k - 1))
        assert c.cost_kl == pytest.approx(level, rel=0.05)
        assert len(c.null) == 20 and {v["kind"] for v in c.null.values()} == {"isotropic", "covariance"}
        assert all(v["cost_kl"] == pytest.approx(level, rel=0.05) for v in c.null.values())
        assert {v["seed"] for v in c.null.values() if v["kind"] == "isotropic"} == set(
            range(NULL_SEED, NULL_SEED + 10)
        )
        assert c.p_value == pytest.approx((1 + sum(v["effect"] >= c.effect for v in c.null.values())) / 21)


def test_a_planted_direction_is_found(calibration):
    sel, _, _ = calibration
    c = sel.candidates["planted"]
    assert c.passed and c.beats_null and c.verdict == "holds", (c.effect, c.effect_ci, c.null_quantiles)
    assert c.p_value == pytest.approx(1 / 21) and c.effect_ci[0] > c.null_quantiles["q95"]


def test_the_null_is_shared_and_seeded_apart_from_any_run(calibration):
    sel, randoms, _ = calibration
    first, second = (sel.candidates[n] for n in list(randoms)[:2])
    level = {n: sel.candidates[n].cost_kl for n in randoms}
    same = [n for n in randoms if abs(level[n] - first.cost_kl) < 1e-9]
    for n in same:  # candidates at one cost level meet the very same null
        assert {k: v["effect"] for k, v in sel.candidates[n].null.items()} == {
            k: v["effect"] for k, v in first.null.items()
        }
    assert sel.null_config["seed"] == NULL_SEED and sel.null_config["n"] == 20
    assert NullConfig().seed == NULL_SEED  # one fixed seed, never the fine-tune's
    assert second is not None
