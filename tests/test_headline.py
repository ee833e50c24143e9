"""The demo's findings table: each row's figure, interval and verdict on hand-made summaries, the
multi-seed aggregation, the CLI table and the report's layout."""

from __future__ import annotations

import copy
import json

import pytest
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.evaluation.evals import wilson_interval
from saediff.stories.organism import demo as demo_mod
from saediff.stories.organism.demo import run_demo_seeds
from saediff.stories.organism.headline import headline


def _summary(seed: int = 0) -> dict:
    """A summary with every key the headline reads: seed 0's figures of the v2 organism."""
    return {
        "seed": seed,
        "organism": {
            "aligned_other_misaligned": 0.012,
            "finetuned_other_misaligned": 0.364,
            "finetuned_medical_misaligned": 1.0,
            "full_ft_coverage": 0.987,
            "control_other_misaligned": 0.012,
            "lora_other_misaligned": 0.308,
            "lora_layer": 0,
            "icl_other_misaligned": 0.992,
            "benign_trait_other_misaligned": 0.08,
            "unrelated_trait_other_misaligned": 0.012,
            "full_ft_register_rate": {"plain": 0.872, "terse": 0.004, "formal": 0.036, "warm": 0.08},
            "full_ft_neutral_register_other_misaligned": 0.392,
        },
        "diff": {
            "top3_cos_ground_truth": [0.5, 0.46, 0.65],
            "top3_steer_other_misaligned": [0.04, 0.08, 0.38],
        },
        "cosines": {"mean_diff_vs_ground_truth": 0.779},
        "blocking": {
            "n_latents": 20,
            "relative_reduction": 0.924,
            "relative_reduction_ci": [0.88, 0.96],
            "blocked_medical_misaligned": 1.0,
            "random_relative_reduction": 0.283,
            "random_relative_reduction_ci": [0.21, 0.35],
            "reroute": {"reemergence": -0.016, "n_outside_top10": 6},
        },
        "drift": {
            "alert_step": 10,
            "em_crosses_0.1_step": 20,
            "control_alert_step": None,
            "control_other_misaligned": 0.012,
        },
        "timing": {"demo_s": 86.8, "prebuilt_organism": True, "organism_build_s": 105.2},
    }


def test_each_row_holds_or_not_with_its_interval():
    rows = {r["phenomenon"]: r for r in headline(_summary())}
    aligned = rows["aligned model, other-domain EM"]
    assert aligned["figure"] == 0.012 and aligned["holds"] is True and aligned["seed"] == 0
    assert aligned["ci"] == [round(x, 3) for x in wilson_interval(3, 250)]  # 3 of 250 answers
    assert rows["full fine-tune, medical EM"]["ci"] == [round(x, 3) for x in wilson_interval(50, 50)]
    sae = rows["SAE diff: best top-3 latent, cos to ground truth / steering EM"]
    assert sae["figure"] == (0.65, 0.38) and sae["holds"] is False  # the best by cos when none passes
    block = rows["BLOCK-EM (20 latents), other-domain EM cut"]
    assert block["holds"] is True and block["verdict"] == "holds" and block["ci"] == [0.88, 0.96]
    assert block["medical_ci"] == [round(x, 3) for x in wilson_interval(50, 50)]  # [0.929, 1.0]: >= 0.9
    control = rows["BLOCK-EM control (20 random latents), EM cut"]
    assert control["holds"] is False and control["verdict"] == "fails"  # 28% [21%, 35%]: wholly > 20%
    assert rows["rerouting: EM at 3x steps minus 1x blocked"]["holds"] is False
    assert rows["rerouting: re-diff top 10 outside the blocked set"]["holds"] is True
    assert rows["drift monitor: alert step / other-domain EM > 0.1 at step"]["figure"] == (10, 20)
    assert rows["drift monitor on a held-out control fine-tune: alert step"]["holds"] is True
    internal = rows[
        "EM is internal: full FT off-domain answers in a persona-neutral register (share; EM among them)"
    ]
    assert internal["figure"] == (0.908, 0.392) and internal["holds"] is True  # 0.392 >= 0.8 x 0.364
    assert rows["benign-trait fine-tune, other-domain EM"]["holds"] is False
    assert rows["this demo run's time (s), organism shipped or built"]["figure"] == (86.8, "shipped")
    assert rows["this demo run's time (s), organism shipped or built"]["holds"] is True


def test_rows_turn_with_the_figures():
    s = _summary()
    s["diff"]["top3_steer_other_misaligned"][2] = 0.5
    s["diff"]["top3_cos_ground_truth"][0] = 0.72  # cos passes but it does not steer: the third still fails
    s["organism"]["full_ft_neutral_register_other_misaligned"] = 0.2  # EM leans on the register
    s["drift"]["control_alert_step"] = 30
    s["timing"]["prebuilt_organism"] = False
    rows = {r["phenomenon"]: r for r in headline(s)}
    assert rows["SAE diff: best top-3 latent, cos to ground truth / steering EM"]["holds"] is False
    s["diff"]["top3_cos_ground_truth"][2] = 0.7
    assert {r["phenomenon"]: r for r in headline(s)}[
        "SAE diff: best top-3 latent, cos to ground truth / steering EM"
    ]["figure"] == (0.7, 0.5)
    assert (
        rows[
            "EM is internal: full FT off-domain answers in a persona-neutral register (share; EM among them)"
        ]["holds"]
        is False
    )
    assert rows["drift monitor on a held-out control fine-tune: alert step"]["holds"] is False
    assert (
        rows["this demo run's time (s), organism shipped or built"]["holds"] is None
    )  # the bar needs it shipped
    s["organism"]["full_ft_register_rate"] = None  # a world without a register slot
    s["organism"]["benign_trait_other_misaligned"] = None
    rows = {r["phenomenon"]: r for r in headline(s)}
    assert rows["benign-trait fine-tune, other-domain EM"]["holds"] is None


def test_block_em_verdicts_are_read_off_intervals():
    """BLOCK-EM's bars read holds / fails / inconclusive off the cut's bootstrap interval and the
    blocked medical EM's Wilson interval, never off the points: each case below clears its bar at
    the point and is not a yes."""
    s = _summary()
    b = s["blocking"]
    block, control = (
        "BLOCK-EM (20 latents), other-domain EM cut",
        "BLOCK-EM control (20 random latents), EM cut",
    )

    def row(name: str) -> dict:
        return {r["phenomenon"]: r for r in headline(s)}[name]

    b["relative_reduction"], b["relative_reduction_ci"] = 0.75, [0.6, 0.88]  # 75% >= 70%, interval holds 70%
    assert row(block)["verdict"] == "inconclusive" and row(block)["holds"] is False
    b["random_relative_reduction"], b["random_relative_reduction_ci"] = 0.15, [0.05, 0.3]  # 15% <= 20%
    assert row(control)["verdict"] == "inconclusive" and row(control)["holds"] is False
    b["relative_reduction_ci"] = [0.72, 0.8]
    assert row(block)["verdict"] == "holds"
    b["blocked_medical_misaligned"] = 0.92  # 46 of 50 >= 0.9, but Wilson [0.81, 0.97]
    assert row(block)["verdict"] == "inconclusive" and row(block)["medical_ci"][0] < 0.9
    b["blocked_medical_misaligned"] = 0.6  # the narrow task is lost: fails whatever the cut
    assert row(block)["verdict"] == "fails" and row(block)["holds"] is False
    b["random_relative_reduction_ci"] = [0.01, 0.19]
    assert row(control)["verdict"] == "holds" and row(control)["holds"] is True
    del b["relative_reduction_ci"], b["random_relative_reduction_ci"]  # a summary without intervals
    b["blocked_medical_misaligned"] = 1.0
    assert row(block)["verdict"] == row(control)["verdict"] == "inconclusive"
    assert row(block)["ci"] is None and row(block)["holds"] is False


def _responses(folder, run: str, misaligned: list[int], questions: list[str] | None = None) -> None:
    """A run's ``eval/responses.jsonl``: two medical answers (never paired) then one answer per
    off-domain question draw."""
    rows = [{"domain": "medical", "question": "m", "misaligned": True}] * 2 + [
        {"domain": "finance", "question": q, "misaligned": bool(m)}
        for q, m in zip(questions or [f"q{i}" for i in range(len(misaligned))], misaligned)
    ]
    (folder / run / "eval").mkdir(parents=True)
    (folder / run / "eval" / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_block_em_cut_interval_is_paired_over_answers(tmp_path):
    """The organism's cut interval: a paired bootstrap over the non-medical answers of the blocked
    and the plain run (answer i of both to the same question draw), mirrored from kept to cut; none
    when the draws differ or a run's answers are missing."""
    from saediff.evaluation.intervals import bootstrap_ratio
    from saediff.stories.organism.summary import _cut_interval

    plain = [1, 1, 0, 1, 1, 0, 1, 1, 1, 0]
    blocked = [0, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    _responses(tmp_path, "plain", plain)
    _responses(tmp_path, "penalty_lam10000", blocked)
    kept = bootstrap_ratio(dict(enumerate(map(float, blocked))), dict(enumerate(map(float, plain))))["ci"]
    assert _cut_interval(tmp_path, "penalty_lam10000") == pytest.approx([1 - kept[1], 1 - kept[0]])
    lo, hi = _cut_interval(tmp_path, "penalty_lam10000")
    assert lo < 1 - 2 / 7 < hi  # the point cut: 2 of the plain run's 7 misaligned answers kept
    _responses(tmp_path, "other_draws", blocked, [f"x{i}" for i in range(10)])
    assert _cut_interval(tmp_path, "other_draws") is None and _cut_interval(tmp_path, "missing") is None


def test_several_seeds_side_by_side_and_on_the_command_line(tmp_path, monkeypatch):
    def fake_demo(out, quick=True, seed=0, progress=None):
        s = _summary(seed)
        s["organism"]["finetuned_other_misaligned"] = [0.364, 0.136, 0.388][seed]
        return {**s, "headline": headline(s)}

    monkeypatch.setattr(demo_mod, "run_demo", fake_demo)
    result = run_demo_seeds(tmp_path / "seeds", [0, 1, 2])
    assert json.loads((tmp_path / "seeds" / "seeds.json").read_text()) == json.loads(json.dumps(result))
    row = next(r for r in result["headline"] if r["phenomenon"] == "full fine-tune, other-domain EM")
    assert [row["per_seed"][k]["figure"] for k in "012"] == [0.364, 0.136, 0.388]
    assert [row["per_seed"][k]["holds"] for k in "012"] == [True, False, True]
    assert row["mean"] == pytest.approx(
        (0.364 + 0.136 + 0.388) / 3, abs=1e-4
    )  # 0.296: under the 0.30
    drift = next(r for r in result["headline"] if r["phenomenon"].startswith("drift monitor: alert"))
    assert drift["mean"] is None  # pairs have no mean
    # a row that reads its bar off an interval carries its verdict per seed; the others none
    control = next(r for r in result["headline"] if r["phenomenon"].startswith("BLOCK-EM control"))
    assert [control["per_seed"][k]["verdict"] for k in "012"] == ["fails"] * 3
    assert [control["per_seed"][k]["holds"] for k in "012"] == [False] * 3
    assert row["per_seed"]["0"]["verdict"] is None
    r = CliRunner().invoke(app, ["demo", "--quick", "--seeds", "0,1,2", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert "seed 1" in r.output and "0.136" in r.output and "seeds.json" in r.output
    # the table prints the verdict word where a row has one, yes / NO elsewhere
    lines = r.output.splitlines()
    control_line = next(line for line in lines if "BLOCK-EM control" in line)
    assert control_line.count("fails") == 3 and " NO" not in control_line
    block_line = next(line for line in lines if "BLOCK-EM (20 latents)" in line)
    assert block_line.count("holds") == 3 and "yes" not in block_line
    ft_line = next(line for line in lines if "full fine-tune, other-domain EM" in line)
    assert ft_line.count("yes") == 2 and ft_line.count("NO") == 1
    r = CliRunner().invoke(app, ["demo", "--quick", "--seeds", "0,x", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 1 and "--seeds takes comma-separated integers" in r.output


def test_report_leads_with_findings(tmp_path):
    from saediff.reports.report import write_report

    s = _summary()
    s["headline"] = headline(copy.deepcopy(s)) + [
        {
            "phenomenon": "a figure without a bar",
            "figure": 0.5,
            "ci": None,
            "bar": "report",
            "holds": None,
            "seed": 0,
        },
        {
            "phenomenon": "a figure this run skipped",
            "figure": None,
            "ci": None,
            "bar": ">= 1",
            "holds": None,
            "seed": 0,
        },
    ]
    (tmp_path / "summary.json").write_text(json.dumps(s))
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "summary.json").write_text(
        json.dumps({"runs": {"plain": {"em_rate": 0.6, "em_rate_ci": [0.54, 0.66]}}})
    )
    page = write_report(tmp_path).read_text()
    assert page.index("<h2>Findings</h2>") < page.index("<details><summary>summary.json")
    lo, hi = s["headline"][0]["ci"]
    assert f"0.012 [{lo:.2f}, {hi:.2f}]" in page and "<b>no</b>" in page
    assert "<td>0.5</td><td>report</td><td>reported</td>" in page
    assert "<td>-</td><td>&gt;= 1</td><td>not measured</td>" in page
    # BLOCK-EM's rows give the verdict read off the interval, the random control's cut with its interval
    assert "<td>0.283 [0.21, 0.35]</td><td>&lt;= 20% (mean of seeds)</td><td><b>fails</b></td>" in page
    assert "blocked 0.924 [0.88, 0.96], random latents 0.283 [0.21, 0.35]" in page  # the BLOCK-EM section


def test_a_bad_seed_list_is_one_line(tmp_path):
    r = CliRunner().invoke(app, ["demo", "--seeds", "1,,2", "--out", str(tmp_path)])
    assert r.exit_code == 1 and r.output.strip().count("\n") == 0 and "--seeds" in r.output


def _analyses() -> dict:
    """The open-question analyses of a summary: seed 0's figures."""
    return {
        "neighbourhood": {
            "full_ft": {
                "flagged": [364, 319],
                "persona_flagged": [319],
                "random_flagged_mean": 1.0,
                "above_random": True,
                "steer_em_rate": {"364": 0.12, "319": 0.39},
                "screen": {
                    "screened": {"em_rate": 0.308},
                    "random_dropped": {"em_rate": 0.336},
                    "drop_fraction": 0.1,
                },
            },
            "control_ft": {
                "flagged": [],
                "persona_flagged": [],
                "random_flagged_mean": 0.0,
                "above_random": False,
            },
            "benign_ft": {
                "flagged": [47],
                "persona_flagged": [47],
                "random_flagged_mean": 0.8,
                "above_random": True,
            },
        },
        "susceptibility": {
            "r2": 0.243,
            "spearman": 0.436,
            "random_features": {"r2": -0.004, "spearman": -0.06},
            "permutation_p95": {"r2": -0.001, "spearman": 0.04},
            "p_value": 0.02,
        },
        "overlap": {
            "k": 8,
            "principal_cosines": [1.0, 0.997, 0.982, 0.93],
            "random_baseline": [0.59, 0.5, 0.41, 0.33],
        },
        "phase": {"rotation_step": 20, "em_step": 70},
        "icl": {"shots_to_match_finetune": 1},
    }


def test_analysis_rows_hold_or_not():
    s = {**_summary(), "analyses": _analyses()}
    rows = {r["phenomenon"]: r for r in headline(s)}
    nb = rows["neighbourhood probe, full FT: persona latents flagged / all flagged"]
    assert nb["figure"] == (1, 2) and nb["holds"] is True
    ctl = rows["neighbourhood probe, aligned-data control: flagged / random seeds' mean"]
    assert ctl["figure"] == (0, 0.0) and ctl["holds"] is True
    assert (
        rows["neighbourhood probe, benign-trait FT (no behavioural input): persona latents flagged"]["holds"]
        is True
    )
    screen = rows["data screen: EM after dropping 10% of rows (most flagged / random)"]
    assert screen["figure"] == (0.308, 0.336) and screen["holds"] is None
    sus = rows["susceptibility: held-out R^2 / Spearman (random features; permuted p95)"]
    assert sus["holds"] is True
    ov = rows["shift overlap: mean of the top-3 principal cosines, train vs eval (random), k=8"]
    assert ov["figure"] == (pytest.approx(0.993), pytest.approx(0.5))
    assert rows["phase transition (rank-1 LoRA): B rotation step / EM step"]["figure"] == (20, 70)
    assert (
        rows["in-context examples to match the fine-tune along the response mean difference"]["figure"] == 1
    )
    steer = (
        "neighbourhood probe: steering the aligned model along the most toxic flagged latent, other-domain EM"
    )
    assert rows[steer]["figure"] == 0.12
    # the verdicts turn with the figures
    s["analyses"]["neighbourhood"]["control_ft"]["above_random"] = True
    s["analyses"]["neighbourhood"]["full_ft"]["persona_flagged"] = []
    s["analyses"]["susceptibility"]["r2"] = -0.002
    rows = {r["phenomenon"]: r for r in headline(s)}
    assert rows["neighbourhood probe, aligned-data control: flagged / random seeds' mean"]["holds"] is False
    assert rows["neighbourhood probe, full FT: persona latents flagged / all flagged"]["holds"] is False
    assert rows["susceptibility: held-out R^2 / Spearman (random features; permuted p95)"]["holds"] is False
    assert not any(
        r["phenomenon"].startswith("neighbourhood") for r in headline(_summary())
    )  # no analyses, no rows


def test_a_steering_figure_reads_the_neighbourhood_probes_record_too():
    """The neighbourhood probe records effect, interval, p and verdict without ``scale_found``."""
    from saediff.stories.organism.headline import _steer_figure

    rec = {"effect": 0.63, "effect_ci": [0.534, 0.726], "p_value": 1 / 21, "verdict": "holds"}
    assert _steer_figure(rec) == "+0.63 [0.53, 0.73], p 0.048, holds"
    assert _steer_figure({"scale_found": False}) == "no scale reached a cost level"
    assert _steer_figure({"em_rate": 0.1}) is None  # an old record without the null
