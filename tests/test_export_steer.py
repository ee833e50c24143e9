"""``saediff export`` carries the scales a real-model ``saediff steer`` run chose (steer.json), with
their verdicts against the null, into the manifest and the llama.cpp control vectors, as it does the
organism's steering.json."""

from __future__ import annotations

import json

import pytest
from helpers import make_random_sae
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.evaluation.fake_server import FakeOpenAIServer


def _diff_run(tiny_qwen, tmp_path, max_new_tokens: int):
    """A diff run of the tiny Qwen and its adapter through a random SAE at block 1, top latent only."""
    make_random_sae(tmp_path / "sae", 32, "blocks.1.hook_resid_post")
    run = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        [
            "diff",
            "--base",
            str(tiny_qwen / "model"),
            "--adapter",
            str(tiny_qwen / "lora"),
            "--sae",
            str(tmp_path / "sae"),
            "--prompts",
            "first_plot",
            "--max-new-tokens",
            str(max_new_tokens),
            "--top",
            "1",
            "--out",
            str(run),
        ],
    )
    assert r.exit_code == 0, r.output
    return run


def test_export_uses_a_real_model_steer_json(tiny_qwen, tmp_path):
    import gguf

    from saediff.cli.common import _judge_evaluator
    from saediff.interventions.causal import SteerConfig, run_causal_checks
    from saediff.interventions.steer_null import NullConfig
    from saediff.models.loading import ModelSpec

    run = _diff_run(tiny_qwen, tmp_path, max_new_tokens=3)
    # what ``saediff steer RUN --judge-url ...`` runs, with a budget the tiny random model reaches (its KL
    # on the neutral text saturates near 0.015 nats/token) and a null of 4 directions
    cfg = SteerConfig(n_latents=1, kl_budget=0.008, levels=(0.5, 1.0), null=NullConfig(2, 2))
    with FakeOpenAIServer() as server:
        judge = _judge_evaluator(server.url, "j", "first_plot", 1, 3, "OPENAI_API_KEY", run / "steer", 0)
        base = str(tiny_qwen / "model")
        run_causal_checks(
            run,
            ModelSpec(base),
            ModelSpec(base, adapter=str(tiny_qwen / "lora"), merge=True),
            *judge.halves(),
            cfg,
        )
    steer = json.loads((run / "steer.json").read_text())
    r = CliRunner().invoke(
        app, ["export", str(run), "--out", str(tmp_path / "exp"), "--top", "1", "--format", "saediff,gguf"]
    )
    assert r.exit_code == 0, r.output
    entries = {
        e["name"]: e for e in json.loads((tmp_path / "exp" / "manifest.json").read_text())["directions"]
    }
    assert steer["induce"] and set(steer["induce"]) <= set(entries)
    for name, ind in steer["induce"].items():
        assert ind["scale_found"], name  # every candidate reaches a cost level at this budget
        e = entries[name]
        # the coefficient on the unit vector the check chose, and in units of the residual norm
        assert e["validated_scale"] == pytest.approx(ind["scale_abs"])
        assert e["validated_scale_x_resid_norm"] == ind["scale"]
        assert e["steer_em_rate"] == ind["em_rate"] and e["steer_em_rate_ci"] == ind["em_rate_ci"]
        # beside it, what the check found against the null at the same cost
        assert e["steer_cost_kl"] == ind["cost_kl"] and e["steer_effect"] == ind["effect"]
        assert e["steer_effect_ci"] == ind["effect_ci"] and e["steer_p_value"] == ind["p_value"]
        assert e["steer_verdict"] == ind["verdict"] in ("holds", "fails", "inconclusive")
        assert e["steer_null_q95"] == ind["null_quantiles"]["q95"] and len(ind["null"]) == 4
        reader = gguf.GGUFReader(str(tmp_path / "exp" / "gguf" / f"{name}.gguf"))
        assert reader.get_field("saediff.validated_scale").contents() == pytest.approx(
            ind["scale_abs"], rel=1e-6
        )
    unsteered = [n for n in entries if n not in steer["induce"]]
    assert unsteered and all("validated_scale" not in entries[n] for n in unsteered)


def test_export_names_a_broken_steer_json(tiny_qwen, tmp_path):
    run = _diff_run(tiny_qwen, tmp_path, max_new_tokens=2)
    # a candidate no scale reached a cost level for: no validated scale, none in its control vector
    top = json.loads((run / "run.json").read_text())["steps"]["diff"]["top_latents"][0]
    (run / "steer.json").write_text(
        json.dumps(
            {
                "induce": {
                    f"sae_{top}": {
                        "scale": None,
                        "scale_abs": None,
                        "em_rate": None,
                        "note": "no scale reached",
                    }
                }
            }
        )
    )
    r = CliRunner().invoke(
        app, ["export", str(run), "--out", str(tmp_path / "e0"), "--format", "saediff,gguf"]
    )
    assert r.exit_code == 0, r.output
    entries = {
        e["name"]: e for e in json.loads((tmp_path / "e0" / "manifest.json").read_text())["directions"]
    }
    assert entries[f"sae_{top}"]["validated_scale"] is None
    assert entries[f"sae_{top}"]["steer_note"] == "no scale reached"
    (run / "steer.json").write_text(json.dumps({"induce": {"sae_0": {"scale": 1.0}}}))
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 1 and "steer.json: induce.sae_0 lacks scale_abs, em_rate" in r.output
