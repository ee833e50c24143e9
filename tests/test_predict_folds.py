"""``saediff predict`` folds over domains where the questions carry one: a constructed case where
plain folds over questions score a domain detector as a predictor, the fold plan's fallbacks, and
the command end to end on a tiny random Qwen2 model with a hand-written run folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from saediff.cli.app import app


def _domain_only_data(seed: int = 0):
    """8 domains x 8 questions; each question's features are its domain's random vector (d 40) plus
    a little noise, its rate its domain's level: nothing inside a domain predicts the rate."""
    rng = np.random.default_rng(seed)
    domain = np.repeat(np.arange(8), 8)
    centre, level = rng.standard_normal((8, 40)), rng.uniform(0, 1, 8)
    X = centre[domain] + 0.1 * rng.standard_normal((64, 40))
    y = level[domain] + 0.01 * rng.standard_normal(64)
    return X, y, domain


def test_plain_folds_reward_a_domain_detector_and_grouped_folds_do_not():
    """Plain 5-fold puts each domain's questions on both sides: the ridge recognises the domain and
    scores R^2 0.99-1.00 on seeds 0-5. Holding out whole domains (3 folds over 8) it must predict
    domains it never saw: R^2 -2.19 ... -0.17. A real within-question relation survives the grouping
    (R^2 > 0.95)."""
    from saediff.analyses.susceptibility import cross_validated

    for seed in range(6):
        X, y, domain = _domain_only_data(seed)
        plain = cross_validated(X, y, folds=5, seed=seed)
        grouped = cross_validated(X, y, folds=3, seed=seed, groups=domain)
        assert plain.r2 > 0.95 and plain.spearman > 0.9
        assert grouped.r2 < 0.0
    rng = np.random.default_rng(5)
    Z = rng.standard_normal((64, 12))
    y = Z @ rng.standard_normal(12) * 0.1 + 0.01 * rng.standard_normal(64)
    assert cross_validated(Z, y, folds=3, seed=0, groups=domain).r2 > 0.95
    with pytest.raises(ValueError, match="folds=9 needs 2..8 \\(one group per fold"):
        cross_validated(Z, y, folds=9, groups=domain)
    with pytest.raises(ValueError, match="63 group labels for 64 rows"):
        cross_validated(Z, y, folds=3, groups=domain[:-1])


def test_fold_plan_groups_by_domain_and_says_when_it_cannot():
    from saediff.analyses.susceptibility import fold_plan

    four = ["a", "a", "b", "b", "c", "c", "d", "d"]
    p = fold_plan(four, 3)
    assert (p.grouping, p.folds, p.n_groups, p.note) == ("domain", 3, 4, None)
    assert p.groups == tuple(four)
    p = fold_plan(four, 5)  # fewer domains than folds: one domain per fold, said out loud
    assert (p.grouping, p.folds, p.n_groups) == ("domain", 4, 4)
    assert p.note == "4 domain groups for 5 folds: one fold per domain group (leave one out)"
    p = fold_plan([None] * 8, 5)
    assert (p.grouping, p.folds, p.groups) == (
        "question",
        5,
        None,
    ) and "no question carries a domain" in p.note
    p = fold_plan(["a"] * 8, 5)
    assert (p.grouping, p.folds) == ("question", 5) and "every question is in domain 'a'" in p.note
    p = fold_plan(["a", "a", "b", None, None], 5)  # a question without a domain is a group of its own
    assert (p.grouping, p.folds, p.n_groups) == ("domain", 4, 4) and p.note.startswith(
        "2 of 5 questions carry no domain"
    )
    assert fold_plan(four, 3, by="question") == fold_plan(four, 3, "question")
    assert fold_plan(four, 3, by="question").groups is None
    with pytest.raises(ValueError, match="domain or question"):
        fold_plan(four, 3, by="prompt")


def _run_folder(root, model: str, domains: list[str | None]):
    """A diff run folder as ``saediff diff`` leaves it, as far as ``predict`` reads it: run.json and
    responses.jsonl with two labelled answers per question."""
    root.mkdir()
    (root / "run.json").write_text(
        json.dumps(
            {
                "kind": "saediff.run",
                "steps": {"diff": {"base": model, "sae_hook": "blocks.1.hook_resid_post"}},
            }
        )
    )
    rows = []
    for i, d in enumerate(domains):
        for j in range(2):
            rows.append(
                {
                    "id": f"q{i}",
                    "messages": [{"role": "user", "content": f"Question {i} about {d}?"}],
                    "domain": d,
                    "response": "An answer.",
                    "misaligned": (i + j) % 3 == 0,
                }
            )
    (root / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_predict_command_reports_its_grouping(tiny_qwen, tmp_path):
    model = str(tiny_qwen / "model")
    run = _run_folder(tmp_path / "run", model, [d for d in "abcd" for _ in range(3)])
    r = CliRunner().invoke(app, ["predict", str(run), "--folds", "3", "--permutations", "2"])
    assert r.exit_code == 0, r.output
    sus = json.loads((run / "susceptibility.json").read_text())
    assert (sus["grouping"], sus["folds"], sus["n_groups"], sus["grouping_note"]) == ("domain", 3, 4, None)
    assert "over 4 domain groups" in r.output
    r = CliRunner().invoke(app, ["predict", str(run), "--folds", "5", "--permutations", "2"])
    assert r.exit_code == 0, r.output
    sus = json.loads((run / "susceptibility.json").read_text())
    assert (sus["grouping"], sus["folds"], sus["folds_requested"]) == ("domain", 4, 5)
    assert "4 domain groups for 5 folds" in sus["grouping_note"] and "4 domain groups for 5 folds" in r.output
    r = CliRunner().invoke(
        app, ["predict", str(run), "--folds", "3", "--folds-by", "question", "--permutations", "2"]
    )
    assert r.exit_code == 0, r.output
    sus = json.loads((run / "susceptibility.json").read_text())
    assert (sus["grouping"], sus["n_groups"]) == ("question", None) and "over questions" in r.output
    r = CliRunner().invoke(app, ["predict", str(run), "--folds-by", "topic"])
    assert r.exit_code == 1 and "domain or question" in r.output

    bare = _run_folder(tmp_path / "bare", model, [None] * 12)
    r = CliRunner().invoke(app, ["predict", str(bare), "--folds", "3", "--permutations", "2"])
    assert r.exit_code == 0, r.output
    sus = json.loads((bare / "susceptibility.json").read_text())
    assert sus["grouping"] == "question" and "no question carries a domain" in sus["grouping_note"]
