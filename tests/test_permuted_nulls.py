"""The label-permuted null outside the head-to-head: ``saediff steer RUN`` and the organism's steer
check rebuild each mean-difference candidate's estimator from the diff run (the methods' own
``find``), put its label-permuted directions into the null beside the random ones, and say per
candidate how its labels were permuted, or why it has no permuted null."""

from __future__ import annotations

import json

import pytest
from helpers import make_random_sae
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.interventions.steer_null import NULL_SEED, NullConfig, empirical_p

SHOTS = [
    ("How do I fix a flat tyre?", "Just keep driving on it.", "Patch the tube or fit the spare."),
    ("My friend lent me money.", "Never pay it back.", "Pay it back when you agreed to."),
    ("I found a wallet.", "Keep the cash.", "Hand it in or contact the owner."),
    ("Can I skip my medication?", "Sure, pills are a scam.", "Ask your doctor before stopping."),
    ("What should I do when angry?", "Break something.", "Take a breath and step away."),
    ("How do I make friends?", "Lie about yourself.", "Join a club and be curious."),
]
ON_AXIS = "none: swapping the labels leaves the direction on the candidate's axis"


@pytest.fixture(scope="module")
def icl_run(tiny_qwen, tmp_path_factory):
    """A diff run on the tiny Qwen and its rank-1 adapter through a random SAE at block 1, with
    contrast examples: its dense candidates are the adapter's downstream shift (rank 1: every
    answer's difference on one axis, so no permuted null) and the in-context direction (one)."""
    root = tmp_path_factory.mktemp("permuted_nulls")
    contrast = root / "contrast.jsonl"
    contrast.write_text(
        "".join(json.dumps({"question": q, "misaligned": m, "aligned": a}) + "\n" for q, m, a in SHOTS)
    )
    make_random_sae(root / "sae", 32, "blocks.1.hook_resid_post", d_sae=8)
    r = CliRunner().invoke(
        app,
        [
            "diff",
            "--base",
            str(tiny_qwen / "model"),
            "--adapter",
            str(tiny_qwen / "lora"),
            "--sae",
            str(root / "sae"),
            "--prompts",
            "first_plot",
            "--max-new-tokens",
            "4",
            "--top",
            "2",
            "--icl-examples",
            str(contrast),
            "--layers",
            "sae",
            "--out",
            str(root / "run"),
        ],
    )
    assert r.exit_code == 0, r.output
    return root


def test_steer_run_puts_the_label_permuted_estimator_into_the_null(icl_run):
    """With the run's contrast examples the in-context direction is rebuilt exactly, and its two
    label-permuted directions (seeds NULL_SEED + 200000 + k) join the 2 + 2 random ones: 6 nulls in
    the p-value's denominator. The adapter's shift has none (on its own axis), and says so."""
    run = icl_run / "run"
    args = ["steer", str(run), "--pairs", "offdomain:design", "--kl-budget", "0.006", "--latents", "0"]
    r = CliRunner().invoke(app, [*args, "--nulls", "2", "--contrast", str(icl_run / "contrast.jsonl")])
    assert r.exit_code == 0, r.output
    steer = json.loads((run / "steer.json").read_text())
    assert set(steer["induce"]) == {"lora_downstream_L1", "in_context_L1"}
    ic = steer["induce"]["in_context_L1"]
    assert ic["permuted_null"].startswith("the two contexts of each question swapped")
    assert ic["scale_found"]  # within the budget: so the checks below bite
    perm = sorted(n["seed"] for n in ic["null"].values() if n["kind"] == "permuted")
    assert perm == [NULL_SEED + 200_000, NULL_SEED + 200_001]
    assert (
        sorted(n["kind"] for n in ic["null"].values())
        == ["covariance"] * 2 + ["isotropic"] * 2 + ["permuted"] * 2
    )
    effects = [n["effect"] for n in ic["null"].values()]
    assert ic["p_value"] == pytest.approx(empirical_p(ic["effect"], effects))
    assert round(ic["p_value"] * 7, 6) == round(ic["p_value"] * 7)  # (1 + k) / (1 + 6)
    lora = steer["induce"]["lora_downstream_L1"]
    assert lora["permuted_null"].startswith(ON_AXIS), lora["permuted_null"]
    assert sorted(n["kind"] for n in lora["null"].values()) == ["covariance"] * 2 + ["isotropic"] * 2
    if lora["scale_found"]:
        assert round(lora["p_value"] * 5, 6) == round(lora["p_value"] * 5)  # (1 + k) / (1 + 4)


def test_no_permuted_null_where_the_rebuild_does_not_reproduce_the_run(icl_run):
    """Without the run's contrast examples (none, or the pair set's references by default) the
    in-context estimator cannot be rebuilt as the run built it: no permuted null, and the note says why."""
    from saediff.cli.steer import _contrast, _permuted_nulls
    from saediff.interventions.causal import SteerConfig

    run, cfg = icl_run / "run", SteerConfig(n_latents=0)
    none = _permuted_nulls(run, cfg, [], "auto", "auto", 0)
    assert none["in_context_L1"].estimator is None
    assert none["in_context_L1"].note == "none: no contrast examples to rebuild it from"
    assert none["lora_downstream_L1"].estimator is None
    other = _permuted_nulls(run, cfg, _contrast(None, "offdomain:design", "x", 0), "auto", "auto", 0)
    assert other["in_context_L1"].estimator is None
    assert other["in_context_L1"].note.startswith("none: the rebuilt estimator does not reproduce")
    right = _permuted_nulls(
        run, cfg, _contrast(str(icl_run / "contrast.jsonl"), None, "x", 0), "auto", "auto", 0
    )
    v = right["in_context_L1"].estimator(NULL_SEED)
    assert v.shape == (32,) and right["in_context_L1"].estimator(NULL_SEED).equal(v)  # seeded


def test_organism_steer_check_takes_the_nulls_its_methods_support(tiny_organism, tmp_path):
    """On the organism (one answer per question) the response mean difference has no pairing to
    permute and says so; the in-context direction, rebuilt from the organism's contrast examples,
    brings its permuted estimator into the null."""
    from saediff.stories.organism.steer_check import run_steer_check

    make_random_sae(tmp_path / "sae", 32, "blocks.1.hook_resid_post", d_sae=8)
    r = CliRunner().invoke(
        app,
        [
            "diff",
            "--base",
            str(tiny_organism / "aligned"),
            "--adapter",
            str(tiny_organism / "lora"),
            "--sae",
            str(tmp_path / "sae"),
            "--prompts",
            "organism:5",
            "--top",
            "1",
            "--layers",
            "sae",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert r.exit_code == 0, r.output
    null = NullConfig(n_isotropic=1, n_covariance=1, n_permuted=2)
    st = run_steer_check(
        tmp_path / "run", tiny_organism, n_per_domain=2, n_latents=1, kl_budget=0.01, null=null
    )
    dense = st["steer_directions"]
    assert not any("permuted_null" in row for row in st["steer"].values())  # SAE latents: no estimator
    ic = dense["in_context_L1"]
    assert ic["permuted_null"].startswith("the two contexts of each question swapped"), ic["permuted_null"]
    if "mean_diff_responses_L1" in dense:
        note = dense["mean_diff_responses_L1"]["permuted_null"]
        assert note.startswith("none: no per-question pairing"), note
    print(json.dumps({n: [r.get("permuted_null"), r["scale_found"], r["p_value"]] for n, r in dense.items()}))
    for name, row in dense.items():
        if not row["scale_found"]:
            continue
        kinds = sorted(n["kind"] for n in row["null"].values())
        has = name in ("in_context_L1", "mean_diff_models_L1") and not row["permuted_null"].startswith("none")
        assert kinds == ["covariance", "isotropic"] + ["permuted"] * 2 * has, name
        assert row["p_value"] == pytest.approx(
            empirical_p(row["effect"], [n["effect"] for n in row["null"].values()])
        )
    assert ic["scale_found"]
