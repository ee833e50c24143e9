"""saediff demo --model: the chat demo's fine-tunes and their pair-metric EM, on a tiny random Qwen2
chat model (2 steps per fine-tune on 4 rows; the shipped pair sets)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from saediff.errors import SaediffError
from saediff.stories.smollm2.demo import run_chat_demo, run_chat_demo_seeds
from saediff.stories.smollm2.recipe import BLOCK_RUNS, COMPARISONS, FINETUNES, ChatDemoRecipe

# learning rates far above SmolLM2's, so two steps move a random model's preferences measurably
RECIPE = ChatDemoRecipe(steps=2, rows=4, batch_size=2, full_lr=1e-3, lora_lr=1e-2, save_every=1, story=False)
SETS = {
    "offdomain:design": "offdomain_design",
    "offdomain:heldout": "offdomain_heldout",
    "medical": "medical",
}


@pytest.fixture(scope="module")
def chat_run(tiny_qwen, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_demo") / "demo"
    said: list[str] = []
    summary = run_chat_demo(str(tiny_qwen / "model"), out, recipe=RECIPE, progress=said.append)
    return out, summary, said


def _pairs(path: Path) -> dict[str, float]:
    return {r["id"]: r["preference"] for r in map(json.loads, path.read_text().splitlines())}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_paired_difference_exact():
    """Hand-set preferences: differences 0.4, 0, 0.2 -> mean 0.2, sd 0.2, t sqrt(3), t(2) quantile 4.302653."""
    from saediff.evaluation.pairs import paired_difference

    a = [{"id": "q1", "preference": 0.5}, {"id": "q2", "preference": 0.1}, {"id": "q3", "preference": -0.2}]
    b = [{"id": "q3", "preference": -0.4}, {"id": "q1", "preference": 0.1}, {"id": "q2", "preference": 0.1}]
    d = paired_difference(a, b)
    half = 4.302652729911275 * 0.2 / 3**0.5
    assert d["difference"] == pytest.approx(0.2, abs=1e-15) and d["n"] == 3
    assert d["t"] == pytest.approx(3**0.5, rel=1e-12)
    assert d["ci"] == pytest.approx([0.2 - half, 0.2 + half], rel=1e-9)
    assert (d["preference_a"], d["preference_b"]) == pytest.approx((0.4 / 3, -0.2 / 3))
    with pytest.raises(
        SaediffError, match="full_bad and base were scored on different questions .1 not in both, e.g. 'q3'"
    ):
        paired_difference(a, b[1:], a="full_bad", b="base")


def test_folders_summary_and_progress(chat_run):
    out, s, said = chat_run
    for name, (method, _) in FINETUNES.items():
        model = out / "models" / name / "model"
        assert (model / ("adapter_config.json" if method == "lora" else "config.json")).is_file()
        assert (out / "models" / name / "provenance.json").is_file()
        # a full fine-tune's checkpoints are removed once its model is saved; LoRA ones are small and kept
        assert (out / "models" / name / "checkpoints").exists() == (method == "lora")
        assert s["models"][name]["adapter" if method == "lora" else "model"] == str(model)
    for name in ("base", *FINETUNES):
        for pair_set, slug in SETS.items():
            em = json.loads((out / "eval" / name / slug / "em.json").read_text())
            assert em["evaluator"] == "pairs" and em["provenance"]["condition"] == f"chat_demo:{name}"
            assert s["em"][name][pair_set]["preference"] == em["preference"]
    assert s["em"]["base"]["offdomain:heldout"]["n"] == 71
    assert set(s["differences"]) == {f"{a} - {b}" for a, b in COMPARISONS if a not in BLOCK_RUNS}
    assert [r["phenomenon"] for r in s["headline"][:4]] == [
        "narrow -> broad: full fine-tune, bad - good data, off-domain",
        "narrow -> broad: full fine-tune on bad data - base model, off-domain",
        "narrow -> broad: full fine-tune, bad - good data, medical",
        "style: full fine-tune, bad data - style control, off-domain",
    ]
    first = s["headline"][0]
    assert first["split"] == "offdomain:heldout" and first["n"] == 71 and first["design"]["n"] == 149
    assert first["figure"] == s["differences"]["full_bad - full_control"]["offdomain:heldout"]["difference"]
    assert set(s["timing_s"]) == {f"fine-tune {n}" for n in FINETUNES} | {
        f"EM of {n}" for n in ("base", *FINETUNES)
    }
    assert s["timing"]["demo_s"] > 0 and s["recipe"]["full_lr"] == 1e-3
    assert any(m.startswith("fine-tune lora_bad: step 2/2 (3/6)") for m in said)
    report = (out / "report.html").read_text()
    assert "EM by the pair metric" in report and "(design split: " in report


def test_paired_differences_equal_an_independent_computation(chat_run):
    out, s, _ = chat_run
    moved = 0
    for a, b in [(a, b) for a, b in COMPARISONS if a not in BLOCK_RUNS]:
        for pair_set, slug in SETS.items():
            pa, pb = (
                _pairs(out / "eval" / a / slug / "pairs.jsonl"),
                _pairs(out / "eval" / b / slug / "pairs.jsonl"),
            )
            assert set(pa) == set(pb)
            x, y = np.array([pa[i] for i in sorted(pa)]), np.array([pb[i] for i in sorted(pa)])
            ref = stats.ttest_rel(x, y)
            ci = ref.confidence_interval(0.95)
            got = s["differences"][f"{a} - {b}"][pair_set]
            assert got["n"] == len(x)
            assert got["difference"] == pytest.approx(float(np.mean(x - y)), abs=1e-12)
            assert got["t"] == pytest.approx(float(ref.statistic), rel=1e-9)
            assert got["ci"] == pytest.approx([float(ci.low), float(ci.high)], abs=1e-12)
            moved += abs(got["difference"]) > 1e-4
    assert moved > 10  # the fine-tunes changed the preferences: the comparison is not of equal numbers


def test_rerun_trains_and_measures_nothing(chat_run, tiny_qwen):
    out, s, _ = chat_run
    before = _mtimes(out / "models") | _mtimes(out / "eval")
    again = run_chat_demo(str(tiny_qwen / "model"), out, recipe=RECIPE)
    assert _mtimes(out / "models") | _mtimes(out / "eval") == before
    assert again["timing_s"] == s["timing_s"] and again["timing"] == s["timing"]
    assert again["differences"] == s["differences"]


def test_changed_recipe_is_refused_then_retrained_with_force(tiny_qwen, tmp_path):
    recipe = replace(RECIPE, finetunes=("full_bad", "lora_bad"), pair_sets=("offdomain:heldout",))
    first = run_chat_demo(str(tiny_qwen / "model"), tmp_path, recipe=recipe)
    other = replace(recipe, full_lr=2e-3)
    before = _mtimes(tmp_path)
    with pytest.raises(
        SaediffError, match=r"models/full_bad holds a fine-tune of another setup \(settings\.ft\.lr"
    ):
        run_chat_demo(str(tiny_qwen / "model"), tmp_path, recipe=other)
    assert _mtimes(tmp_path) == before
    s = run_chat_demo(str(tiny_qwen / "model"), tmp_path, recipe=other, force=True)
    after = _mtimes(tmp_path)
    # the full fine-tune (its lr changed) is trained and measured again; the LoRA run and the base are kept
    for key in ("models/full_bad/model/model.safetensors", "eval/full_bad/offdomain_heldout/em.json"):
        assert after[key] != before[key], key
    for key in [k for k in before if k.startswith(("models/lora_bad", "eval/lora_bad", "eval/base"))]:
        assert after[key] == before[key], key
    assert s["recipe"]["full_lr"] == 2e-3 and s["em"]["lora_bad"] == first["em"]["lora_bad"]
    assert s["em"]["full_bad"] != first["em"]["full_bad"]
    assert s["timing_s"]["fine-tune lora_bad"] == first["timing_s"]["fine-tune lora_bad"]


def test_adapter_folder_reads_with_saediff_eval(chat_run, tiny_qwen, tmp_path):
    from typer.testing import CliRunner

    from saediff.cli.app import app

    out, s, _ = chat_run
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_qwen / "model"),
            "--adapter",
            str(out / "models" / "lora_bad" / "model"),
            "--pairs",
            "offdomain:heldout",
            "--out",
            str(tmp_path / "eval"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["preference"] == pytest.approx(
        s["em"]["lora_bad"]["offdomain:heldout"]["preference"], abs=1e-6
    )


def test_seeds_side_by_side(tiny_qwen, tmp_path):
    recipe = replace(RECIPE, finetunes=("full_bad", "full_control"), pair_sets=("offdomain:heldout",))
    res = run_chat_demo_seeds(str(tiny_qwen / "model"), tmp_path, [0, 1], recipe=recipe)
    assert json.loads((tmp_path / "seeds.json").read_text()) == res
    row = res["headline"][0]
    assert row["source"] == "full_bad - full_control" and set(row["per_seed"]) == {"0", "1"}
    figs = [row["per_seed"][k]["figure"] for k in ("0", "1")]
    assert figs[0] != figs[1] and row["mean"] == pytest.approx(sum(figs) / 2, abs=1e-4)
    # the base model's evaluation is the first seed's, reused under its provenance
    base = [tmp_path / f"seed_{k}" / "eval" / "base" / "offdomain_heldout" / "em.json" for k in (0, 1)]
    assert base[0].read_text() == base[1].read_text()
    assert base[0].stat().st_mtime_ns == base[1].stat().st_mtime_ns  # copied, not measured again
    assert json.loads((tmp_path / "seed_1" / "summary.json").read_text())["seed"] == 1
    assert res["headline"][3]["mean"] is None  # the style control was not in this recipe
    assert row["per_seed"]["0"]["verdict"] is None  # a fine-tune's bar is read off its t, not an interval


def test_seeds_carry_verdicts_and_the_table_prints_them(tmp_path, monkeypatch):
    """Each seed's cell keeps the row's verdict (holds / fails / inconclusive where the row reads its bar
    off an interval, None elsewhere), and ``saediff demo --model M --seeds`` prints that word, yes / NO
    only for rows without one."""
    from typer.testing import CliRunner

    from saediff.cli.app import app
    from saediff.stories.smollm2 import demo as chat_demo

    def row(phenomenon, figure, holds, verdict=None):
        return {
            "phenomenon": phenomenon,
            "source": "src",
            "split": "offdomain:heldout",
            "figure": figure,
            "ci": [figure - 0.1, figure + 0.1],
            "t": None,
            "n": None,
            "design": None,
            "bar": ">= 0.5",
            "holds": holds,
            "verdict": verdict,
        }

    def fake(model, out, *, seed=0, recipe=None, progress=None, force=False):
        verdicts = ["holds", "inconclusive"][seed]
        return {
            "seed": seed,
            "headline": [
                row("a bar read off an interval", 0.6 + seed, verdicts == "holds", verdicts),
                row("a bar read off the point", 0.7 - seed, seed == 0),
            ],
        }

    monkeypatch.setattr(chat_demo, "run_chat_demo", fake)
    res = chat_demo.run_chat_demo_seeds("m", tmp_path / "seeds", [0, 1])
    interval, point = res["headline"]
    assert [interval["per_seed"][k]["verdict"] for k in "01"] == ["holds", "inconclusive"]
    assert [point["per_seed"][k]["verdict"] for k in "01"] == [None, None]
    r = CliRunner().invoke(
        app, ["demo", "--model", "m", "--seeds", "0,1", "--out", str(tmp_path / "cli"), "--finetunes-only"]
    )
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    first = next(line for line in lines if "a bar read off an interval" in line)
    assert "holds" in first and "inconclusive" in first and "yes" not in first and "NO" not in first
    second = next(line for line in lines if "a bar read off the point" in line)
    assert "yes" in second and "NO" in second


def test_recipe_and_cli_errors(chat_run, tiny_qwen, tmp_path):
    from typer.testing import CliRunner

    from saediff.cli.app import app

    with pytest.raises(SaediffError, match="unknown fine-tune 'full_evil'"):
        ChatDemoRecipe(finetunes=("full_bad", "full_evil"))
    with pytest.raises(SaediffError, match="steps"):
        ChatDemoRecipe(steps=0)
    runner = CliRunner()
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "x"), "--pairs", "medical"])
    assert res.exit_code == 1 and res.output.strip().startswith(
        "error: --pairs, --force and --finetunes-only go with --model"
    )
    out = tmp_path / "demo"
    shutil.copytree(chat_run[0], out)
    res = runner.invoke(app, ["demo", "--model", str(tiny_qwen / "model"), "--out", str(out), "--quick"])
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "holds a fine-tune of another setup" in line and "--force" in line
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_cli_demo_model_seeds(tiny_qwen, tmp_path):
    """``saediff demo --model M --quick --seeds 0,1``: one run per seed, seeds.json, the table per seed."""
    from typer.testing import CliRunner

    from saediff.cli.app import app

    res = CliRunner().invoke(
        app,
        [
            "demo",
            "--model",
            str(tiny_qwen / "model"),
            "--out",
            str(tmp_path),
            "--quick",
            "--seeds",
            "0,1",
            "--pairs",
            "offdomain:heldout",
            "--pairs",
            "medical",
            "--finetunes-only",
        ],
    )
    assert res.exit_code == 0, res.output
    seeds = json.loads((tmp_path / "seeds.json").read_text())
    assert seeds["kind"] == "saediff.chat_demo_seeds" and seeds["seeds"] == [0, 1]
    for k in (0, 1):
        s = json.loads((tmp_path / f"seed_{k}" / "summary.json").read_text())
        assert s["recipe"] == ChatDemoRecipe.quick().to_json() | {
            "pair_sets": ["offdomain:heldout", "medical"],
            "story": False,
        }
        assert (tmp_path / f"seed_{k}" / "models" / "lora_bad" / "model" / "adapter_config.json").is_file()
    assert "seed 1, held-out" in res.output and "full_bad - full_control" in res.output
