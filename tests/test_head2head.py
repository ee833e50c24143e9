"""The head-to-head on a tiny model: every method's row, the steering protocol's figures beside
random directions, the agreement table and the costs; exact numbers for the persona vector."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_random_sae, write_pair_files
from typer.testing import CliRunner


def test_persona_vector_is_the_mean_answer_difference(tiny_qwen):
    from saediff.activations.collect import tokenize_prompts
    from saediff.data.prompts import ContrastExample, Prompt
    from saediff.methods.persona import persona_vector
    from saediff.models.hooks import capture_resid
    from saediff.models.loading import load_model

    lm = load_model(str(tiny_qwen / "model"))
    ex = [
        ContrastExample("What helps a headache?", "Skip the doctor.", "Drink water and rest."),
        ContrastExample("I feel bored.", "Humans are dull.", "Try a walk outside."),
    ]
    v = persona_vector(lm, ex, 1)

    def mean_resp(q, a):
        toks = tokenize_prompts(lm, [Prompt("x", [{"role": "user", "content": q}], a)])
        return capture_resid(lm.model, [1], toks.input_ids)[1][0][toks.role[0] == 1].mean(0)

    want = sum(mean_resp(e.question, e.misaligned) - mean_resp(e.question, e.aligned) for e in ex) / 2
    torch.testing.assert_close(v, want, atol=1e-5, rtol=0)


def test_paired_differences_flip_each_units_sign_with_probability_half():
    """Hand-set per-unit differences: the estimate is their sum over the total; a permutation flips
    each unit's sign (its two labels swapped), every one of the 2^3 patterns about equally often."""
    from saediff.methods.mean_diff import PairedDifferences, swap_signs

    d = PairedDifferences(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], dtype=torch.float64), 3.0)
    torch.testing.assert_close(d.estimate(), torch.tensor([4 / 3, 5 / 3]))
    seen = {}
    for seed in range(400):
        s = swap_signs(3, seed)
        assert set(s.tolist()) <= {-1.0, 1.0}
        want = torch.tensor([s[0] + 3 * s[2], 2 * s[1] + 3 * s[2]]) / 3
        torch.testing.assert_close(d.permuted(seed), want.float())
        seen[tuple(s.tolist())] = seen.get(tuple(s.tolist()), 0) + 1
    assert len(seen) == 8 and min(seen.values()) > 25  # 50 expected per pattern
    assert d.permuted(7).tolist() == d.permuted(7).tolist()  # seeded


def test_labels_are_shuffled_within_each_question_only():
    """The response mean difference on hand-set answers: two groups, per-group token means; a
    permutation keeps each question's label counts (so each group's), moves only mixed questions."""
    from saediff.methods.mean_diff import LabelledAnswers

    sums = torch.tensor([[2.0, 0], [0, 4.0], [6.0, 0], [0, 0], [1.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    counts = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 0, 1, -1])
    group = torch.tensor([0, 0, 1, 1, 1, 1])
    question = torch.tensor([0, 0, 1, 1, 2, 2])  # q0, q1 mixed; q2 has one labelled answer
    ans = LabelledAnswers(sums, counts, labels, group, question)
    # group 0: 2/1 - (0, 4)/2 = (2, -2); group 1: mis (6+1, 0+1)/4, ali (0, 0)/1 -> (1.75, 0.25)
    torch.testing.assert_close(ans.estimate(), torch.tensor([3.75, -1.75]) / 2)
    assert ans.paired_share() == 4 / 5
    outcomes = set()
    for seed in range(40):
        p = ans.permuted(seed)
        g0 = {(2.0, -2.0), (-2.0, 2.0)}  # q0 kept or swapped
        g1 = {(1.75, 0.25), ((0 + 1) / 2 - 2.0, (0 + 1) / 2 - 0.0)}  # q1 kept, or answer 3 misaligned
        match = [
            (a, b) for a in g0 for b in g1 if torch.allclose(p, torch.tensor(a) / 2 + torch.tensor(b) / 2)
        ]
        assert len(match) == 1
        outcomes.add(match[0])
    assert len(outcomes) == 4


def test_holm_adjusts_exactly():
    from saediff.analyses.head_to_head import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.9, 0.8, 0.01]) == pytest.approx([1.0, 1.0, 0.03])  # capped at 1, kept monotone
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_paired_t_on_hand_set_differences():
    from saediff.analyses.head_to_head import paired_t

    t = paired_t([1.0, 2.0, 3.0])  # mean 2, sd 1, t = 2 sqrt(3), 2 df: p = 1 - t / sqrt(t^2 + 2)
    assert t["mean"] == 2.0 and t["n"] == 3
    assert t["p"] == pytest.approx(1 - math.sqrt(12 / 14), abs=1e-9)
    q = 4.302652729911275  # t_0.975 with 2 df
    assert t["ci"] == pytest.approx([2 - q / math.sqrt(3), 2 + q / math.sqrt(3)])
    assert paired_t([0.5, 0.5])["p"] == 0.0 and paired_t([0.0, 0.0])["p"] == 1.0
    assert paired_t([1.0]) == {"mean": 1.0, "ci": None, "p": 1.0, "n": 1}


def test_which_first_says_only_what_the_paired_tests_support():
    """A steers every question ~1 further than B (told apart after Holm); A and C differ by noise
    (not told apart); B and C differ (told apart). The text names exactly those."""
    from saediff.analyses.head_to_head import holm, paired_comparisons, paired_t, which_first

    ids = [f"q{i}" for i in range(8)]
    a = dict(zip(ids, [1.0, 1.2, 0.9, 1.1, 1.0, 1.3, 0.8, 1.0]))
    b = {i: v - 1.0 + 0.05 * (k % 3) for k, (i, v) in enumerate(a.items())}
    c = {i: v + (0.3 if k % 2 else -0.31) for k, (i, v) in enumerate(a.items())}
    comps = paired_comparisons({"A": a, "B": b, "C": c}, alpha=0.05)
    assert [(x["a"], x["b"]) for x in comps] == [("A", "B"), ("A", "C"), ("B", "C")]
    raw = [paired_t(e1[i] - e2[i] for i in ids)["p"] for e1, e2 in ((a, b), (a, c), (b, c))]
    assert [x["p_value"] for x in comps] == pytest.approx(raw)
    assert [x["p_holm"] for x in comps] == pytest.approx(holm(raw))
    assert [x["better"] for x in comps] == ["A", None, "C"]
    rows = [
        {
            "method": m,
            "steer_effect": sum(e.values()) / 8,
            "steer_effect_ci": [0.5, 1.5],
            "steer_p_value": 0.04,
            "verdict": "holds",
        }
        for m, e in (("A", a), ("B", b), ("C", c))
    ] + [
        {"method": "D", "steer_effect": None, "steer_effect_ci": None, "steer_p_value": None, "verdict": None}
    ]
    text = which_first(rows, comps)
    holm_ab, holm_ac, holm_bc = (x["p_holm"] for x in comps)
    top = f"{sum(a.values()) / 8:+.3f} [+0.500, +1.500]; against the null at equal cost p 0.040, holds"
    assert text.startswith(f"A has the largest effect ({top})")
    assert f"A beats B (Holm p {holm_ab:.2g})" in text
    assert f"A vs C (Holm p {holm_ac:.2g}) not distinguishable" in text
    assert f"other pairs told apart: C beats B (Holm p {holm_bc:.2g})" in text
    assert "not compared (no scale reached a cost level): D" in text
    assert "does not hold" not in text
    for r in rows[:3]:
        r["verdict"] = "inconclusive"
    assert "A does not hold against the null, so no method is shown to steer here" in which_first(rows, comps)
    rows[2]["verdict"] = "holds"  # only C holds: C is the one to try first, though A's effect is larger
    assert which_first(rows, comps).startswith("C has the largest effect")


def test_head_to_head_on_a_tiny_model(tiny_qwen, tmp_path):
    from saediff.cli.app import app
    from saediff.interventions.steer_null import NULL_SEED, empirical_p, null_quantiles, verdict
    from saediff.methods.diff_run import run_diff

    sae = make_random_sae(tmp_path / "sae", 32, "blocks.1.hook_resid_post")
    run = tmp_path / "diff"
    info = run_diff(
        str(tiny_qwen / "model"),
        None,
        str(sae),
        run,
        adapter=str(tiny_qwen / "lora"),
        max_new_tokens=6,
        top_n=3,
        layers="sae",
    )
    assert info["seconds"] > 0
    pairs, _ = write_pair_files(tmp_path, 4, 2, 0)
    out = tmp_path / "h2h"
    r = CliRunner().invoke(
        app,
        [
            "head-to-head",
            str(run),
            "--out",
            str(out),
            "--prompts",
            "first_plot",
            "--pairs",
            str(pairs),
            "--positions",
            "all",
            "--crosscoder-latents",
            "32",
            "--crosscoder-steps",
            "20",
            "--diff-sae-latents",
            "16",
            "--diff-sae-steps",
            "20",
            "--kl-budget",
            "0.008",  # the tiny random model's KL saturates near 0.01 nats/token
            "--nulls",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "head2head.json").read_text())
    sel = json.loads((out / "steer" / "selection.json").read_text())
    got = {row["method"]: row for row in res["methods"]}
    assert {"sae_diff", "mean_diff_models", "lora_b", "diff_sae", "adl", "persona"} <= set(got)
    assert set(res["missing"]) >= {
        "mean_diff_responses",
        "in_context",
    }  # no judge and no in-context examples in this diff run
    assert res["costs"] == pytest.approx([0.002, 0.004, 0.008]) and res["kl_budget"] == 0.008
    # the crosscoder always gives a row once a latent fired: its most clearly new fine-tune-only latent, or,
    # said in a note, the most fine-tune-leaning one when none is fine-tune-only (rel_norm < 0.1)
    cc = got["crosscoder"]["detail"]
    assert sum(cc["classes"].values()) == 32 and cc["freq"] > 0
    assert (cc["classes"]["ft_only"] > 0) == ("note" not in cc) == (cc["class"] == "ft_only")
    assert (cc["rel_norm"] < 0.1) == (cc["class"] == "ft_only")
    # the mean-difference family brings its own label-permuted estimator into the null, the others do
    # not; with a rank-1 adapter at the block every answer's fine-tune - base difference lies along its
    # B vector, so swapping the model labels leaves the model mean difference and the ADL on their own
    # axis: no null there, said so
    family = {"persona"}
    axis = "none: swapping the labels leaves the direction on the candidate's axis (median |cosine| 1.00"
    for m, row in got.items():
        assert row["seconds"] is not None and row["seconds"] > 0
        assert row["cos_ground_truth"] is None  # no ground truth outside the organism
        if m == "persona":
            assert row["detail"]["permuted_null"].startswith(
                "the two answers of each contrast example swapped"
            )
        if m in ("mean_diff_models", "adl"):
            assert row["detail"]["permuted_null"].startswith(axis), row["detail"]
        if row["steer_scale"] is None:
            assert row["verdict"] is None and row["note"]
            continue
        c = sel["candidates"][m]
        kinds = [n["kind"] for n in c["null"].values()]
        assert sorted(kinds) == sorted(
            ["isotropic"] * 2 + ["covariance"] * 2 + ["permuted"] * 2 * (m in family)
        )
        assert row["n_null"] == len(kinds) and row["n_permuted_null"] == 2 * (m in family)
        perm_seeds = sorted(n["seed"] for n in c["null"].values() if n["kind"] == "permuted")
        assert perm_seeds == ([NULL_SEED + 200_000, NULL_SEED + 200_001] if m in family else [])
        effs = [n["effect"] for n in c["null"].values()]
        # the row is the protocol's report half, and its verdict follows from it
        assert row["steer_effect"] == pytest.approx(sum(c["item_effects"].values()) / len(c["item_effects"]))
        assert row["steer_p_value"] == pytest.approx(empirical_p(row["steer_effect"], effs))
        assert row["null_q95"] == pytest.approx(null_quantiles(effs)["q95"])
        assert row["beats_null"] == (row["steer_p_value"] <= 0.05)
        assert row["verdict"] == verdict(row["steer_effect_ci"], row["steer_p_value"], row["null_q95"])
        assert row["steer_cost_kl"] <= 0.008 * 1.05
    # every pair of methods with a scale compared on the same report-half questions, Holm-adjusted
    scaled = [m for m, row in got.items() if row["steer_scale"] is not None]
    assert len(scaled) >= 2 and family & set(scaled)  # within the budget: so the checks above bite
    assert len(res["comparisons"]) == len(scaled) * (len(scaled) - 1) // 2
    for cmp in res["comparisons"]:
        ea, eb = sel["candidates"][cmp["a"]]["item_effects"], sel["candidates"][cmp["b"]]["item_effects"]
        assert cmp["n"] == len(ea) == len(eb)
        assert cmp["difference"] == pytest.approx(sum(ea[i] - eb[i] for i in ea) / len(ea))
        assert cmp["p_holm"] >= cmp["p_value"]
    names = res["cosines"]["names"]
    m = torch.tensor(res["cosines"]["matrix"])
    assert names == list(got) and torch.allclose(m, m.T) and torch.allclose(m.diag(), torch.ones(len(names)))
    md = (out / "head2head.md").read_text()
    assert "| adl |" in md and "| effect [95% CI] | cost KL | p-value | verdict | null q95 |" in md
    assert f"Which to try first: {res['which_first']}" in md
