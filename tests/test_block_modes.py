"""Every BLOCK-EM mode through the one generic sweep (issue 22, item 16): ``ablate`` and ``project``
(concept ablation fine-tuning) on any model, not only the organism's own loop."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_random_sae, write_narrow_data
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.errors import SaediffError
from saediff.interventions.block_directions import project_directions, random_directions
from saediff.interventions.block_runs import BlockRunConfig
from saediff.interventions.blockem import run_block_em
from saediff.interventions.finetune import FinetuneConfig
from saediff.interventions.latent_sets import LatentSets
from saediff.saes.loading import load_sae

HOOK = "blocks.0.hook_resid_post"
FT = FinetuneConfig(method="full", lr=1e-3, steps=2, batch_size=4)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    make_random_sae(root / "sae", 32, HOOK)
    write_narrow_data(root / "data.jsonl", 8)
    return root


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


def test_project_mode_trains_with_the_directions_removed(tiny_qwen, root, tmp_path):
    """``run_block_em(mode="project")`` on a plain HF model: the projected run trains differently
    from the plain one, and its control uses seeded random directions of the same shapes."""
    d = {0: torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}
    out = tmp_path / "p"
    summary = run_block_em(
        str(tiny_qwen / "model"),
        root / "data.jsonl",
        None,
        out,
        LatentSets(),
        ft=FT,
        mode="project",
        directions=d,
        progress=False,
    )
    assert set(summary["runs"]) == {"plain", "project", "project_random"}
    em = json.loads((out / "project" / "em.json").read_text())
    assert em["mode"] == "project" and em["project_layers"] == [0]
    plain, proj, rnd = (_weights(out / n) for n in ("plain", "project", "project_random"))
    changed = lambda a, b: max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert changed(plain, proj) > 1e-5 and changed(proj, rnd) > 1e-5
    again = random_directions(d, 0)
    assert again[0].shape == (2, 32) and torch.equal(again[0], random_directions(d, 0)[0])


def test_ablate_mode_removes_latents_on_any_model(tiny_qwen, root, tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "block",
            "--model",
            str(tiny_qwen / "model"),
            "--data",
            str(root / "data.jsonl"),
            "--sae",
            str(root / "sae"),
            "--mode",
            "ablate",
            "--latent",
            "1",
            "--latent",
            "2",
            "--full",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert r.exit_code == 0, r.output
    runs = json.loads((tmp_path / "a" / "summary.json").read_text())["runs"]
    assert set(runs) == {"plain", "ablate", "ablate_random"} and runs["ablate"]["n_latents"] == 2


def test_project_directions_from_latents_and_errors(root):
    sae = load_sae(root / "sae")
    d = project_directions("latents", [0], sae=sae, latents=LatentSets((3, 5)))
    torch.testing.assert_close(d[0], sae.W_dec[[3, 5]].detach().float())
    with pytest.raises(
        SaediffError, match="latent directions live at the SAE's block 0, not at blocks \\[1\\]"
    ):
        project_directions("latents", [1], sae=sae, latents=LatentSets((3,)))
    with pytest.raises(SaediffError, match="'model_diff' needs --diff-run"):
        project_directions("model_diff", [0])
    with pytest.raises(SaediffError, match="unknown project direction 'gt'; choose from latents, model_diff"):
        project_directions("gt", [0])
    with pytest.raises(SaediffError, match="directions go with modes project and steer"):
        BlockRunConfig(mode="project")
    with pytest.raises(SaediffError, match="directions go with modes project and steer"):
        BlockRunConfig(mode="steer")


def test_steer_mode_adds_the_vector_after_its_block(tiny_qwen):
    """Preventative steering on hand-set numbers: inside the blocker, block 0's output is the plain
    one plus the direction at every position; the norm-matched control keeps each row's norm."""
    from saediff.interventions.block_directions import norm_matched_random
    from saediff.interventions.blocking import BlockConfig, Blocker
    from saediff.models.hooks import capture_resid
    from saediff.models.loading import load_model

    lm = load_model(str(tiny_qwen / "model"))
    v = torch.zeros(32)
    v[3], v[7] = 2.0, -1.0
    ids = torch.tensor([[1, 5, 9, 12]])
    plain = capture_resid(lm.model, [0], ids)[0]
    with Blocker(BlockConfig("steer", 0), directions={0: v[None]}).installed(lm.model):
        steered = capture_resid(lm.model, [0], ids)[0]
    torch.testing.assert_close(steered - plain, v.expand(1, 4, 32), rtol=0, atol=1e-6)
    rnd = norm_matched_random({0: 3.0 * v[None]}, 0)[0]
    assert (
        abs(float(rnd.norm()) - float(3.0 * v.norm())) < 1e-4
        and abs(float(torch.cosine_similarity(rnd[0], v, 0))) < 0.9
    )


def test_steer_mode_from_an_exported_direction_without_an_sae(tiny_qwen, root, tmp_path):
    from saediff.methods.directions import Direction
    from saediff.methods.export import export_directions

    g = torch.Generator().manual_seed(1)
    export_directions(
        [Direction("persona", torch.randn(32, generator=g), HOOK, "persona")], tmp_path / "dirs"
    )
    r = CliRunner().invoke(
        app,
        [
            "block",
            "--model",
            str(tiny_qwen / "model"),
            "--data",
            str(root / "data.jsonl"),
            "--mode",
            "steer",
            "--project-direction",
            f"{tmp_path / 'dirs'}:persona",
            "--steer-alpha",
            "4",
            "--full",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert r.exit_code == 0, r.output
    runs = json.loads((tmp_path / "s" / "summary.json").read_text())["runs"]
    assert set(runs) == {"plain", "steer", "steer_random"}
    plain, steer, rnd = (_weights(tmp_path / "s" / n) for n in ("plain", "steer", "steer_random"))
    changed = lambda a, b: max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert changed(plain, steer) > 1e-5 and changed(steer, rnd) > 1e-5
    r = CliRunner().invoke(
        app,
        [
            "block",
            "--model",
            str(tiny_qwen / "model"),
            "--data",
            str(root / "data.jsonl"),
            "--mode",
            "steer",
            "--project-direction",
            f"{tmp_path / 'dirs'}:nope",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert r.exit_code == 1 and "has no direction 'nope' (it has persona)" in r.output
