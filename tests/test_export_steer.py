"""``saediff export`` carries the scales a real-model ``saediff steer`` run validated (steer.json)
into the manifest and the llama.cpp control vectors, as it does the organism's steering.json."""

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

    run = _diff_run(tiny_qwen, tmp_path, max_new_tokens=3)
    with FakeOpenAIServer() as server:
        r = CliRunner().invoke(
            app,
            [
                "steer",
                str(run),
                "--judge-url",
                server.url,
                "--judge-model",
                "j",
                "--samples",
                "1",
                "--max-new-tokens",
                "3",
                "--scales",
                "0.5,2",
                "--latents",
                "1",
                "--random",
                "1",
            ],
        )
        assert r.exit_code == 0, r.output
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
        e = entries[name]
        # the coefficient on the unit vector the check chose, and in units of the residual norm
        assert e["validated_scale"] == pytest.approx(ind["scale_abs"])
        assert e["validated_scale_x_resid_norm"] == ind["scale"]
        assert e["steer_em_rate"] == ind["em_rate"] and e["steer_em_rate_ci"] == ind["em_rate_ci"]
        assert e["steer_random_mean_em_rate"] == ind["random_mean_em_rate"]
        reader = gguf.GGUFReader(str(tmp_path / "exp" / "gguf" / f"{name}.gguf"))
        assert reader.get_field("saediff.validated_scale").contents() == pytest.approx(
            ind["scale_abs"], rel=1e-6
        )
    unsteered = [n for n in entries if n not in steer["induce"]]
    assert unsteered and all("validated_scale" not in entries[n] for n in unsteered)


def test_export_names_a_broken_steer_json(tiny_qwen, tmp_path):
    run = _diff_run(tiny_qwen, tmp_path, max_new_tokens=2)
    # a candidate no scale kept coherent: no validated scale, none in its control vector
    top = json.loads((run / "run.json").read_text())["steps"]["diff"]["top_latents"][0]
    (run / "steer.json").write_text(
        json.dumps(
            {
                "induce": {
                    f"sae_{top}": {
                        "scale": None,
                        "scale_abs": None,
                        "em_rate": None,
                        "note": "no coherent scale",
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
    assert entries[f"sae_{top}"]["steer_note"] == "no coherent scale"
    (run / "steer.json").write_text(json.dumps({"induce": {"sae_0": {"scale": 1.0}}}))
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 1 and "steer.json: induce.sae_0 lacks scale_abs, em_rate" in r.output
