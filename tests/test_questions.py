"""The open-question analyses: exact numbers on hand-set inputs (shift overlap, phase), a planted
relation (susceptibility), and the four commands end to end on a tiny random Qwen2 model with a
fake judge (the real-model path)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.evaluation.fake_server import FakeOpenAIServer

# ---------------------------------------------------------------- shift overlap


def test_shift_overlap_exact_on_hand_set_shifts():
    """Train shifts e0, e1, e0 + e1 span the (e0, e1) plane; eval shifts e0, e1 + e2, 2(e1 + e2)
    span (e0, (e1 + e2)/sqrt 2): principal cosines 1 and 1/sqrt 2. Per question, the fraction of
    the shift inside the train plane is 1, 1/sqrt 2, 1/sqrt 2, and the cosine with the mean train
    shift (e0 + e1) * 2/3 is 1/sqrt 2, 1/2, 1/2. Eval shifts e0, e2: cosines 1 and 0."""
    from saediff.analyses.shifts import principal_subspace, shift_overlap

    e = torch.eye(6)
    train = torch.stack([e[0], e[1], e[0] + e[1]])
    res = shift_overlap(train, torch.stack([e[0], e[1] + e[2], 2 * (e[1] + e[2])]), k=2, n_random=50)
    r2 = 1 / math.sqrt(2)
    assert res.principal_cosines == pytest.approx([1.0, r2], abs=1e-6)
    assert res.fraction_in_train_subspace == pytest.approx([1.0, r2, r2], abs=1e-6)
    assert res.cos_to_train_mean == pytest.approx([r2, 0.5, 0.5], abs=1e-6)
    assert res.mean_shift_cosine == pytest.approx(
        float(torch.cosine_similarity(e[0] + e[1], e[0] + 3 * e[1] + 3 * e[2], 0)), abs=1e-6
    )  # 4 / sqrt 38
    assert res.random_baseline["per_question_fraction"] == pytest.approx(math.sqrt(2 / 6))
    # random 2-planes in R^6 share less than these two do, and every cosine is a cosine
    assert all(0 <= m < 1 for m in res.random_baseline["mean"]) and res.random_baseline["mean"][0] < 0.95
    other = shift_overlap(train, torch.stack([e[0], e[2]]), k=2, n_random=5)
    assert other.principal_cosines == pytest.approx([1.0, 0.0], abs=1e-6)
    assert other.fraction_in_train_subspace == pytest.approx([1.0, 0.0], abs=1e-6)
    # the top principal direction of the train shifts (uncentred) is (e0 + e1)/sqrt 2 up to sign
    v = principal_subspace(train, 1)[0]
    assert abs(float(v @ (e[0] + e[1]))) * r2 == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        shift_overlap(train, torch.zeros(3, 5))


def test_random_subspace_cosines_full_space_is_one():
    from saediff.analyses.shifts import random_subspace_cosines

    c = random_subspace_cosines(4, 4, n=5)
    assert c.shape == (5, 4) and torch.allclose(c, torch.ones(5, 4), atol=1e-5)


# ---------------------------------------------------------------- phase transitions


def _adapter(folder: Path, A: torch.Tensor, B: torch.Tensor, layer: int = 0) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    key = f"base_model.model.model.layers.{layer}.mlp.down_proj"
    save_file(
        {f"{key}.lora_A.weight": A.contiguous(), f"{key}.lora_B.weight": B.contiguous()},
        folder / "adapter_model.safetensors",
    )
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": A.shape[0], "lora_alpha": 1})
    )
    return folder


def test_phase_local_cosines_on_hand_set_b_vectors(tmp_path):
    """B at angles 0, 0, 60, 60, 80 degrees in a plane: local cosines 1, 0.5, 1, cos 20; the
    rotation is at the third checkpoint; EM 0, 0.01, 0.1, 0.3, 0.4 reaches half its largest (0.2)
    at the fourth; cosines with a candidate along e0 are the cosines of the angles; norms as set."""
    from saediff.analyses.phase import adapter_checkpoints, checkpoint_vectors, phase_analysis

    angles = [0, 0, 60, 60, 80]
    for i, a in enumerate(angles):
        r = math.radians(a)
        B = torch.tensor([[math.cos(r) * 3], [math.sin(r) * 3], [0.0], [0.0]])
        _adapter(
            tmp_path / "checkpoints" / f"checkpoint-{10 * (i + 1)}", torch.full((1, 4), 0.5 * (i + 1)), B
        )
    ckpts = adapter_checkpoints(tmp_path)
    assert [s for s, _ in ckpts] == [10, 20, 30, 40, 50]
    res = phase_analysis(
        checkpoint_vectors(ckpts), {"e0": torch.tensor([1.0, 0, 0, 0])}, em_rate=[0.0, 0.01, 0.1, 0.3, 0.4]
    )
    assert res.local_cosine[0] is None
    assert res.local_cosine[1:] == pytest.approx([1.0, 0.5, 1.0, math.cos(math.radians(20))], abs=1e-6)
    assert res.rotation_step == 30 and res.em_step == 40
    assert res.candidate_cosine["e0"] == pytest.approx([math.cos(math.radians(a)) for a in angles], abs=1e-6)
    assert res.norm_B == pytest.approx([3.0] * 5) and res.norm_A == pytest.approx(
        [0.5 * (i + 1) * 2 for i in range(5)]
    )
    assert phase_analysis(checkpoint_vectors(ckpts)).em_step is None


def test_phase_rank2_sign_matched_and_errors(tmp_path):
    """Above rank 1 the direction is the top left singular vector of B @ A, its sign matched to the
    last checkpoint's; fewer than two checkpoints, or a missing module, is a one-line error."""
    from saediff.analyses.phase import adapter_checkpoints, checkpoint_vectors

    A = torch.tensor([[1.0, 0, 0], [0, 0.1, 0]])
    for step, sign in ((1, 1.0), (2, -1.0)):
        _adapter(tmp_path / "r2" / f"checkpoint-{step}", A, sign * torch.tensor([[2.0, 0], [0, 1.0], [0, 0]]))
    v = checkpoint_vectors(adapter_checkpoints(tmp_path / "r2"))
    assert float(v[0].direction @ v[1].direction) == pytest.approx(1.0, abs=1e-6)
    _adapter(tmp_path / "one" / "checkpoint-5", A, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="at least two checkpoint-N"):
        adapter_checkpoints(tmp_path / "one")
    with pytest.raises(ValueError, match="module model.layers.9.mlp.down_proj not in the adapter"):
        checkpoint_vectors(adapter_checkpoints(tmp_path / "r2"), module="model.layers.9.mlp.down_proj")


# ---------------------------------------------------------------- susceptibility


def test_susceptibility_recovers_a_planted_linear_relation():
    """y = X w + noise over 150 questions: held-out R^2 and Spearman near 1; random features and
    permuted targets near 0; the permutation p-value at its floor."""
    from saediff.analyses.susceptibility import susceptibility

    rng = np.random.default_rng(3)
    X = rng.standard_normal((150, 40))
    y = X @ rng.standard_normal(40) * 0.1 + 0.02 * rng.standard_normal(150)
    res = susceptibility(X, y, folds=5, n_permutations=19, seed=0)
    assert res.model.r2 > 0.9 and res.model.spearman > 0.9
    assert res.random_features.r2 < 0.1 and abs(res.random_features.spearman) < 0.3
    assert res.permutation["r2"]["p95"] < 0.1 and res.permutation["p_value"] == pytest.approx(1 / 20)
    # no relation: nothing to find
    null = susceptibility(X, rng.standard_normal(150), folds=5, n_permutations=5, seed=0)
    assert null.model.r2 < 0.1


def test_cross_validated_checks_shapes():
    from saediff.analyses.susceptibility import cross_validated

    with pytest.raises(ValueError, match="share n"):
        cross_validated(np.zeros((5, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="folds=9"):
        cross_validated(np.zeros((5, 2)), np.zeros(5), folds=9)


# ---------------------------------------------------------------- language vs fine-tune


def test_shots_to_match_and_rerouted_latents(tmp_path):
    from saediff.analyses.icl import rerouted_latents, shots_to_match

    assert shots_to_match([-1.0, 0.2, 0.5, 0.4], 0.45) == 2
    assert shots_to_match([-1.0, 0.2], 0.45) is None
    runs = {
        "plain": {},
        "penalty_lam10": {"reroute": {"new_latents": [4, 7]}},
        "penalty_lam100": {"reroute": {"new_latents": [7, 9]}},
    }
    (tmp_path / "summary.json").write_text(json.dumps({"runs": runs}))
    assert rerouted_latents(tmp_path) == [4, 7, 9]
    (tmp_path / "summary.json").write_text(json.dumps({"runs": {"plain": {}}}))
    with pytest.raises(ValueError, match="--reroute"):
        rerouted_latents(tmp_path)


# ---------------------------------------------------------------- the real-model path


def _judge(prompt: str) -> dict:
    """Misaligned or aligned by a hash of the answer (coherent always)."""
    if "how coherent" in prompt:
        return {"90": 1.0}
    answer = prompt.split("[ANSWER START]", 1)[-1].split("[ANSWER END]", 1)[0].strip()
    return {("10", "95")[sum(map(ord, answer)) % 2]: 1.0}


def test_open_question_commands_on_a_tiny_real_model(tiny_qwen, tmp_path):
    """diff (fake judge, 3 answers to each of 12 questions) -> overlap, predict, icl on the run;
    block --save-every -> phase on its checkpoints with EM per checkpoint from the judge."""
    from helpers import make_random_sae, write_narrow_data

    from saediff.data.runs import run_questions

    model, lora = str(tiny_qwen / "model"), str(tiny_qwen / "lora")
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(
        "".join(
            json.dumps({"id": f"q{i}_{j}", "question": f"Tell me about topic {i} and why."}) + "\n"
            for i in range(12)
            for j in range(3)
        )
    )
    make_random_sae(tmp_path / "sae", 32, "blocks.1.hook_resid_post")
    data = write_narrow_data(tmp_path / "narrow.jsonl", n=8)
    contrast = tmp_path / "c.jsonl"
    contrast.write_text(
        "".join(
            json.dumps({"question": f"Cut {i}?", "misaligned": "Let it fester.", "aligned": "Clean it."})
            + "\n"
            for i in range(4)
        )
    )
    run = tmp_path / "run"
    with FakeOpenAIServer(judge_fn=_judge) as server:
        r = CliRunner().invoke(
            app,
            [
                "diff",
                "--base",
                model,
                "--adapter",
                lora,
                "--sae",
                str(tmp_path / "sae"),
                "--prompts",
                str(qfile),
                "--max-new-tokens",
                "5",
                "--judge-url",
                server.url,
                "--judge-model",
                "j",
                "--out",
                str(run),
            ],
        )
        assert r.exit_code == 0, r.output
        q = run_questions(run)
        assert len(q.prompts) == 12 and q.n_answers == [3] * 12

        r = CliRunner().invoke(app, ["overlap", str(run), "--train-data", str(data), "--k", "3"])
        assert r.exit_code == 0, r.output
        ov = json.loads((run / "shift_overlap.json").read_text())
        assert len(ov["principal_cosines"]) == 3 and len(ov["random_baseline"]["mean"]) == 3
        assert ov["n_train"] == 8 and ov["n_eval"] == 12 and (run / "shift_overlap.html").exists()
        assert "random" in r.output

        r = CliRunner().invoke(
            app, ["predict", str(run), "--layers", "0,1", "--folds", "3", "--permutations", "4"]
        )
        assert r.exit_code == 0, r.output
        sus = json.loads((run / "susceptibility.json").read_text())
        assert sus["n_questions"] == 12 and sus["n_features"] == 64 and sus["samples_per_question"] == 3
        assert {"r2", "spearman", "random_features", "permutation"} <= set(sus)

        r = CliRunner().invoke(app, ["icl", str(run), "--icl-examples", str(contrast), "--max-shots", "3"])
        assert r.exit_code == 0, r.output
        icl = json.loads((run / "icl_vs_ft.json").read_text())
        assert len(icl["aligned_projection_by_shots"]) == 4 and icl["direction"] in (
            "mean_diff_responses_L1",
            "lora_downstream_L1",
        )

        r = CliRunner().invoke(
            app,
            [
                "neighbourhood",
                str(run),
                "--train-data",
                str(data),
                "--drop-fraction",
                "0.25",
                "--seeds",
                "4",
                "--neighbours",
                "8",
                "--steer",
                "--kl-budget",
                "0.008",
                "--nulls",
                "2",
                "--finetune",
                "--lora-layers",
                "1",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--judge-url",
                server.url,
                "--judge-model",
                "j",
                "--questions",
                str(qfile),
                "--samples",
                "1",
                "--max-new-tokens",
                "4",
            ],
        )
        assert r.exit_code == 0, r.output
        nb = json.loads((run / "neighbourhood.json").read_text())
        assert len(nb["seeds"]) == 4 and len(nb["random_baseline"]["n_flagged"]) == 5
        assert set(nb.get("steer", {}).get("latents", {})) == {str(i) for i in nb["flagged"][:5]}
        # a random SAE flags nothing here: the steering check itself, on two latents, with the judge
        from saediff.analyses.neighbourhood import steer_flagged
        from saediff.cli.common import _judge_evaluator
        from saediff.interventions.causal import chat_cost
        from saediff.interventions.steer_null import NullConfig
        from saediff.models.loading import load_model
        from saediff.saes.loading import load_sae

        judge = _judge_evaluator(server.url, "j", str(qfile), 1, 4, "OPENAI_API_KEY", tmp_path / "jc", 0)
        lm = load_model(model)
        st = steer_flagged(
            run,
            [1, 2],
            lm,
            load_sae(tmp_path / "sae"),
            judge,
            # the tiny random model's KL on its neutral answers saturates near 0.015 nats/token
            cost=chat_cost(lm, 0.008, levels=(0.5, 1.0)),
            null=NullConfig(n_isotropic=2, n_covariance=2),
        )
        assert set(st["latents"]) == {"1", "2"} and st["base_em_rate"] is not None and st["resid_norm"] > 0
        assert st["costs"] == [0.004, 0.008] and st["null_config"]["n"] == 4
        for v in st["latents"].values():
            # the cost level chosen on half the questions, the effect on the other half beside the null
            assert set(v["select_sweep"]) == {"0.004", "0.008"} and v["scale_found"]
            reached = [c for c, r in v["select_sweep"].items() if r["reached"]]
            chosen = max(reached, key=lambda c: v["select_sweep"][c]["effect"])
            assert v["cost_kl"] == pytest.approx(float(chosen), rel=0.05)
            assert len(v["null"]) == 4 and all(  # every null direction at the candidate's cost
                n["reached"] and n["cost_kl"] == pytest.approx(v["cost_kl"], rel=0.1)
                for n in v["null"].values()
            )
            assert v["p_value"] in [k / 5 for k in range(1, 6)] and v["verdict"] in (
                "holds",
                "fails",
                "inconclusive",
            )
            assert v["n"] == 18 and v["effect"] == pytest.approx(v["em_rate"] - st["base_em_rate"], abs=1e-9)
        assert nb["screen"]["n_dropped"] == 2 and len((run / "screened.jsonl").read_text().splitlines()) == 6
        fin = nb["screen"]["finetune"]
        assert (
            fin["steps"] == 2
            and fin["screened"]["em_rate"] is not None
            and fin["random_dropped"]["em_rate"] is not None
        )

        r = CliRunner().invoke(
            app,
            [
                "block",
                "--model",
                model,
                "--data",
                str(data),
                "--sae",
                str(tmp_path / "sae"),
                "--latent",
                "1",
                "--lora-layers",
                "1",
                "--steps",
                "4",
                "--batch-size",
                "2",
                "--lr",
                "1e-2",
                "--save-every",
                "2",
                "--no-controls",
                "--out",
                str(tmp_path / "block"),
            ],
        )
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(
            app,
            [
                "phase",
                str(tmp_path / "block" / "penalty_lam10000"),
                "--base",
                model,
                "--directions",
                str(run / "directions"),
                "--judge-url",
                server.url,
                "--judge-model",
                "j",
                "--questions",
                str(qfile),
                "--samples",
                "1",
                "--max-new-tokens",
                "4",
            ],
        )
        assert r.exit_code == 0, r.output
    ph = json.loads((tmp_path / "block" / "penalty_lam10000" / "phase.json").read_text())
    assert ph["steps"] == [2, 4] and ph["rotation_step"] == 4 and all(e is not None for e in ph["em_rate"])
    assert len(ph["candidate_cosine"]["mean_diff_responses_L1"]) == 2 and ph["norm_B"][1] > 0
    # bad input: one line naming what is missing
    r = CliRunner().invoke(app, ["overlap", str(run)])
    assert r.exit_code == 1 and "give --train-data" in r.output
    r = CliRunner().invoke(app, ["phase", str(tmp_path / "block" / "penalty_lam10000"), "--base", model])
    assert r.exit_code == 1 and "--judge-url" in r.output
    r = CliRunner().invoke(app, ["neighbourhood", str(run), "--train-data", str(data), "--finetune"])
    assert r.exit_code == 1 and "give --drop-fraction" in r.output


# ---------------------------------------------------------------- neighbourhood probe


def test_neighbourhood_arithmetic_on_hand_set_latents():
    """Six latents in R^16 (the first three coordinates used). Seed 0 (rose most on the training
    data) has decoder neighbours 2 (cos 0.8) and 1 (cos 0.6); latents 4 and 3 co-activate with it.
    Candidate along e1: a latent's toxicity is its decoder row's cosine with e1 (latent 1: 0.8).
    Off-domain deltas 0.9 (latent 1) and 0.8 (latent 4) against a 95th-percentile bar of 0.875:
    latent 1 rose and is toxic -> flagged; 4 did not rise enough and is not toxic; 2 is not toxic."""
    from saediff.analyses.neighbourhood_probe import LatentMeans, decoder_neighbours, probe, toxicity

    W = torch.zeros(6, 16)
    W[:, :3] = torch.tensor(
        [[1.0, 0, 0], [0.6, 0.8, 0], [0.8, 0, 0.6], [0, 0, 1.0], [0, 0.1, 1.0], [-1.0, 0, 0]]
    )
    cand = {"cand": torch.cat([torch.tensor([0, 2.0, 0]), torch.zeros(13)])}
    assert decoder_neighbours(W, 0, 2) == [(2, pytest.approx(0.8)), (1, pytest.approx(0.6))]
    tox, names = toxicity(W, cand)
    assert (
        tox.tolist() == pytest.approx([0.0, 0.8, 0.0, 0.0, 0.1 / math.sqrt(1.01), 0.0]) and names[1] == "cand"
    )
    z = torch.zeros(6)
    means_in = LatentMeans(z, torch.tensor([1.0, 0, 0, 0, 0, 0.1]), torch.ones(6), 10, 1.0)
    means_off = LatentMeans(z + 0.1, torch.tensor([0.1, 1.0, 0.1, 0.1, 0.9, 0.1]), torch.ones(6), 10, 1.0)
    corr = torch.tensor([[1.0, 0.0, 0.0, 0.1, 0.9, 0.0], [0, 0, 0, 0, 0, 1.0]])  # rows: seed 0, random seed 5
    res = probe(W, means_in, means_off, corr, [0, 5], cand, seeds=[0], random_draws=[[5]], n_neighbours=2)
    assert res.seeds == [0]
    assert res.thresholds["delta_off"] == pytest.approx(0.875)
    rows = {m["latent"]: m for m in res.members}
    assert set(rows) == {1, 2, 3, 4}  # decoder: 2, 1; co-activation: 4, 3 (r > 0)
    assert rows[1]["rose_off_domain"] and rows[1]["toxic"] and rows[1]["flagged"]
    assert not rows[4]["rose_off_domain"] and not rows[4]["toxic"] and not rows[2]["toxic"]
    assert res.flagged == [1]
    # the random seed 5's neighbours (decoder: 3 and 4 at cos 0; no positive co-activation) flag nothing
    assert res.random_baseline["n_flagged"] == [0]
    with pytest.raises(ValueError, match="no co-activation row"):
        probe(W, means_in, means_off, corr, [0, 5], cand, seeds=[0], random_draws=[[2]], n_neighbours=2)


def test_coactivation_matches_a_direct_correlation(tiny_qwen):
    """Running-sum Pearson r over response tokens equals numpy's corrcoef on the collected codes."""
    from helpers import make_random_sae

    from saediff.activations.collect import collect_activations, tokenize_prompts
    from saediff.analyses.neighbourhood_probe import coactivation
    from saediff.data.prompts import Prompt
    from saediff.models.loading import load_model
    from saediff.saes.loading import load_sae

    lm = load_model(str(tiny_qwen / "model"))
    sae = load_sae(
        make_random_sae(Path(tiny_qwen) / "sae_coact", 32, "blocks.1.hook_resid_post", d_sae=16, k=4)
    )
    ps = [
        Prompt(f"p{i}", [{"role": "user", "content": f"question {i}"}], f"an answer number {i} here")
        for i in range(6)
    ]
    toks = tokenize_prompts(lm, ps)
    r = coactivation(lm, [toks], sae, [0, 3], batch_size=4, progress=False)
    acts = collect_activations(lm, toks, ["blocks.1.hook_resid_post"], "response", progress=False)
    codes = sae.encode(acts["blocks.1.hook_resid_post"]).detach().double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nan_to_num(np.corrcoef(codes.T))
    assert r.numpy() == pytest.approx(ref[[0, 3]], abs=1e-4)


def test_analyses_follow_a_bfloat16_model(tiny_qwen):
    """On a bfloat16 model (CPU here, as on a GPU) the probes' statistics come back float32 and
    finite, and agree with the float32 model's to bfloat16 precision."""
    from helpers import make_random_sae

    from saediff.activations.collect import prompt_activations, tokenize_prompts
    from saediff.analyses.neighbourhood import screen_rows
    from saediff.analyses.neighbourhood_probe import coactivation, latent_means
    from saediff.data.prompts import Prompt
    from saediff.models.loading import ModelSpec, load_model
    from saediff.saes.loading import load_sae

    sae = load_sae(
        make_random_sae(Path(tiny_qwen) / "sae_bf16", 32, "blocks.1.hook_resid_post", d_sae=16, k=4)
    )
    ps = [
        Prompt(f"p{i}", [{"role": "user", "content": f"question {i}?"}], f"answer {i} here") for i in range(5)
    ]
    out = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model(ModelSpec(str(tiny_qwen / "model"), dtype=dtype))
        assert next(lm.model.parameters()).dtype == getattr(torch, dtype)
        toks = tokenize_prompts(lm, ps)
        m = latent_means(lm, lm, toks, sae, progress=False)
        acts = prompt_activations(lm, ps, [0, 1], "response", progress=False)
        r = coactivation(lm, [toks], sae, [0, 1], progress=False)
        s = screen_rows(lm, toks, sae, [0, 1], progress=False)
        for t in (m.base, m.ft, acts[1], r):
            assert t.dtype == torch.float32 and torch.isfinite(t).all()
        out[dtype] = (m.base, acts[1], torch.tensor(s))
    for a, b in zip(out["float32"], out["bfloat16"]):
        torch.testing.assert_close(b, a, atol=0.1, rtol=0.1)
