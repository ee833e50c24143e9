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
]
ON_AXIS = "none: swapping the labels leaves the direction on the candidate's axis"
RESPONSES = "misaligned / aligned labels shuffled among each question's answers"
CONTEXTS = "the two contexts of each question swapped with probability 1/2"


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def ref_run(tiny_qwen, tmp_path_factory):
    """A diff run on the tiny Qwen and its rank-1 adapter through a random SAE at block 1, read on
    six design-split questions each answered both ways (the references, tagged), with the design
    split's references as in-context examples. Its dense candidates: the adapter's downstream shift
    (rank 1: every answer's difference on one axis, so no permuted null), the reference mean
    difference and the in-context direction (one each)."""
    from saediff.data.em_data import offdomain_pairs

    root = tmp_path_factory.mktemp("permuted_nulls")
    pairs = offdomain_pairs("design")
    refs = [
        {"id": f"{p.id}:{tag}", "question": p.question, "response": getattr(p, tag), "domain": p.domain}
        | {"tags": [tag]}
        for p in pairs[:6]
        for tag in ("misaligned", "aligned")
    ]
    shots = [{"question": p.question, "misaligned": p.misaligned, "aligned": p.aligned} for p in pairs]
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
            _jsonl(root / "refs.jsonl", refs),
            "--icl-examples",
            _jsonl(root / "contrast.jsonl", shots),
            "--top",
            "2",
            "--layers",
            "sae",
            "--out",
            str(root / "run"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["labels"] == {"misaligned": 6, "aligned": 6, "unlabelled": 0}
    return root


def test_steer_run_puts_the_label_permuted_estimators_into_the_null(ref_run):
    """``saediff steer RUN --pairs FILE --contrast FILE``: the reference mean difference and the
    in-context direction (rebuilt from the examples that built it) each bring two
    label-permuted directions (seeds NULL_SEED + 200000 + k) beside the 2 + 2 random ones: 6 nulls
    in the p-value's denominator. The adapter's shift has none (on its own axis), and says so."""
    from dataclasses import asdict

    from saediff.data.em_data import offdomain_pairs

    run = ref_run / "run"
    by: dict = {}
    for p in offdomain_pairs("design"):
        by.setdefault(p.domain, []).append(asdict(p))
    few = [row for d in sorted(by)[:2] for row in by[d][:4]]  # 8 questions: halves of 4 (speed)
    pairs = _jsonl(ref_run / "pairs8.jsonl", few)
    contrast = str(ref_run / "contrast.jsonl")  # what built the run's in-context direction
    args = [
        "steer",
        str(run),
        "--pairs",
        pairs,
        "--contrast",
        contrast,
        "--kl-budget",
        "0.006",
        "--latents",
        "0",
    ]
    r = CliRunner().invoke(app, [*args, "--nulls", "2"])
    assert r.exit_code == 0, r.output
    steer = json.loads((run / "steer.json").read_text())
    assert set(steer["induce"]) == {"lora_downstream_L1", "mean_diff_responses_L1", "in_context_L1"}
    for name, how in (("mean_diff_responses_L1", RESPONSES), ("in_context_L1", CONTEXTS)):
        row = steer["induce"][name]
        assert row["permuted_null"] == how
        assert row["scale_found"], name  # within the budget: so the checks below bite
        perm = sorted(n["seed"] for n in row["null"].values() if n["kind"] == "permuted")
        assert perm == [NULL_SEED + 200_000, NULL_SEED + 200_001]
        kinds = sorted(n["kind"] for n in row["null"].values())
        assert kinds == ["covariance"] * 2 + ["isotropic"] * 2 + ["permuted"] * 2
        assert row["p_value"] == pytest.approx(
            empirical_p(row["effect"], [n["effect"] for n in row["null"].values()])
        )
        assert round(row["p_value"] * 7, 6) == round(row["p_value"] * 7)  # (1 + k) / (1 + 6)
    lora = steer["induce"]["lora_downstream_L1"]
    assert lora["permuted_null"].startswith(ON_AXIS), lora["permuted_null"]
    assert sorted(n["kind"] for n in lora["null"].values()) == ["covariance"] * 2 + ["isotropic"] * 2
    assert round(lora["p_value"] * 5, 6) == round(lora["p_value"] * 5)  # (1 + k) / (1 + 4)
    # the same steer.json on disk and in run.json's steer step
    assert json.loads((run / "run.json").read_text())["steps"]["steer"]["file"] == "steer.json"


def test_no_permuted_null_where_the_rebuild_does_not_reproduce_the_run(ref_run):
    """Without the run's in-context examples (none, or others) the in-context estimator cannot be
    rebuilt as the run built it: no permuted null, and the note says why; the reference mean
    difference needs no examples."""
    from saediff.cli.steer import _permuted_nulls
    from saediff.data.prompts import ContrastExample
    from saediff.interventions.causal import SteerConfig

    run, cfg = ref_run / "run", SteerConfig(n_latents=0)
    none = _permuted_nulls(run, cfg, [], "auto", "auto", 0)
    assert none["in_context_L1"].estimator is None
    assert none["in_context_L1"].note == "none: no contrast examples to rebuild it from"
    assert none["lora_downstream_L1"].estimator is None
    assert none["mean_diff_responses_L1"].note == RESPONSES
    v = none["mean_diff_responses_L1"].estimator(NULL_SEED)
    assert v.shape == (32,) and none["mean_diff_responses_L1"].estimator(NULL_SEED).equal(v)  # seeded
    other = _permuted_nulls(run, cfg, [ContrastExample(*s) for s in SHOTS], "auto", "auto", 0)
    assert other["in_context_L1"].estimator is None
    assert other["in_context_L1"].note.startswith("none: the rebuilt estimator does not reproduce")


def test_organism_steer_check_takes_the_nulls_its_methods_support(tiny_organism, tmp_path):
    """On the organism the in-context direction, rebuilt from the organism's contrast examples,
    brings its permuted estimator into the null (its count in the p-value's denominator); the
    response mean difference (one answer per question: no pairing to permute) says so where the
    run has one (the untrained organism's answers rarely carry both labels); SAE latents get none."""
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
    assert ic["permuted_null"] == CONTEXTS, ic["permuted_null"]
    if "mean_diff_responses_L1" in dense:
        note = dense["mean_diff_responses_L1"]["permuted_null"]
        assert note.startswith("none: no per-question pairing"), note
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
