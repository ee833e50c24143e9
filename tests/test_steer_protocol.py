"""saediff's one steering protocol (``causal.select_and_report``) and its clients (``saediff steer``,
``saediff discover``, the neighbourhood probe's steering check, the organism's): the scale is chosen
on one half of the questions and reported on the other, beside random directions of the same norm,
and a candidate with no coherent scale says so and is never kept."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import make_random_sae
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.data.em_data import offdomain_pairs
from saediff.data.prompts import load_prompts
from saediff.evaluation.evals import EMConfig, JudgeEvaluator
from saediff.evaluation.fake_server import FakeOpenAIServer, default_judge
from saediff.evaluation.judges import HttpJudge
from saediff.evaluation.openai_api import ChatClient
from saediff.interventions import causal
from saediff.interventions.causal import DiscoverConfig, discover_latents
from saediff.models.hooks import capture_resid
from saediff.models.loading import ModelSpec, load_model
from saediff.models.provenance import sae_fingerprint
from saediff.saes.loading import load_sae, save_sae

IDS = torch.tensor([[5, 17, 42, 99]])


def empty_is_incoherent(prompt: str) -> dict[str, float]:
    """The default fake judge, except that an empty answer is incoherent (5) and any other coherent (80)."""
    if "how coherent" in prompt:
        answer = prompt.split("[ANSWER START]\n", 1)[1].split("\n[ANSWER END]", 1)[0]
        return {"5": 1.0} if answer == "" else {"80": 1.0}
    return default_judge(prompt)


class Probed:
    """The judge evaluator, also noting per call the questions it asks and the norm of the vector
    the active intervention adds after block 1 (the residual there on a fixed input, minus the
    unsteered model's)."""

    def __init__(self, inner: JudgeEvaluator, x0: torch.Tensor, log: list):
        self.inner, self.x0, self.log = inner, x0, log

    def __call__(self, lm, out, condition=None):
        with torch.no_grad():
            x = capture_resid(lm.model, [1], IDS)[1]
        self.log.append(
            {
                "condition": condition,
                "half": out.parent.name,
                "questions": {p.id for p in self.inner.prompts},
                "added_norm": float((x - self.x0).norm(dim=-1).mean()),
            }
        )
        return self.inner(lm, out, condition)

    def halves(self):
        return tuple(Probed(h, self.x0, self.log) for h in self.inner.halves())

    def fingerprint(self) -> dict:
        own = getattr(self.inner, "fingerprint", None)
        return {"probed": own() if own else repr(type(self.inner))}


def _evaluator(server, cache) -> JudgeEvaluator:
    """Greedy answers (so steering along the end-of-turn token's embedding ends every answer at once)."""
    client = ChatClient(server.url)
    judges = [
        HttpJudge(k, client, "j", cache_path=cache / f"judge_{k}.jsonl") for k in ("aligned", "coherent")
    ]
    return JudgeEvaluator(
        load_prompts("first_plot"), *judges, EMConfig(samples=1, max_new_tokens=4, temperature=0.0)
    )


def _eos(lm) -> torch.Tensor:
    return lm.model.get_input_embeddings().weight.detach()[lm.tokenizer.eos_token_id].clone()


def test_protocol_selects_on_one_half_reports_on_the_other_beside_equal_norm_random(tiny_qwen, tmp_path):
    from saediff.interventions.steer_protocol import Arm, select_and_report

    lm = load_model(str(tiny_qwen / "model"))
    with torch.no_grad():
        x0 = capture_resid(lm.model, [1], IDS)[1]
    rand = torch.randn(x0.shape[-1], generator=torch.Generator().manual_seed(3))
    log: list = []
    with FakeOpenAIServer(judge_fn=empty_is_incoherent) as server:
        select, report = Probed(_evaluator(server, tmp_path), x0, log).halves()
        sel = select_and_report(
            {"eos": 7.0 * _eos(lm), "rand": rand},
            [Arm("induce", lm)],
            1,
            (2.0, 4.0),
            0.5,
            select,
            report,
            tmp_path / "steer",
            n_random=2,
        )
    ref = sel.unsteered["induce"]
    assert ref["select"]["coherent_rate"] == 1.0 and ref["report"]["n_responses"] == 4  # 4 of the 8 questions
    # steering along the end-of-turn embedding empties every answer: no coherent scale, said so, nothing reported
    eos = sel.candidates["eos"]
    assert not eos.passed and eos.scale is None and eos.report is None
    assert eos.to_json()["note"] == causal.NO_COHERENT_SCALE
    assert all(
        not row["coherent"] and row["induce"]["coherent_rate"] == 0.0 for row in eos.select_sweep.values()
    )
    # a random direction keeps the answers: its scale is chosen on the select half, reported on the other
    rnd = sel.candidates["rand"]
    assert rnd.passed and rnd.scale in (2.0, 4.0) and rnd.scale_abs == rnd.scale * 0.5
    held = rnd.report["induce"]
    assert held["n_responses"] == 4 and len(held["random"]) == 2
    assert held["random_mean_em_rate"] == sum(r["em_rate"] for r in held["random"]) / 2
    asked = {h: {q for c in log if c["half"] == h for q in c["questions"]} for h in ("select", "report")}
    assert len(asked["select"]) == 4 and not asked["select"] & asked["report"]
    assert asked["select"] | asked["report"] == {p.id for p in load_prompts("first_plot")}
    assert all(c["questions"] == asked[c["half"]] for c in log)
    assert {c["condition"] for c in log if c["half"] == "report"} == {
        "base",
        f"rand_induce_x{rnd.scale:g}",
        *(f"random{k}_seed0_induce_x{rnd.scale:g}" for k in range(2)),
    }  # eos: nothing measured on the report half
    assert {c["condition"] for c in log if c["half"] == "select"} == {
        "base",
        *(f"{n}_induce_x{s:g}" for n in ("eos", "rand") for s in (2, 4)),
    }
    for c in log:  # every steered condition adds a vector of norm scale x unit, the random controls too
        if c["condition"] != "base":
            s = float(c["condition"].rsplit("_x", 1)[1])
            assert c["added_norm"] == pytest.approx(s * 0.5, rel=1e-4), c


@pytest.fixture(scope="module")
def diff_run(tiny_qwen, tmp_path_factory):
    """A diff run on the tiny Qwen and its rank-1 adapter through a random SAE at block 1."""
    root = tmp_path_factory.mktemp("steer_protocol")
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
            "--out",
            str(root / "run"),
        ],
    )
    assert r.exit_code == 0, r.output
    return root


def _ids(path) -> set:
    return {json.loads(x)["id"] for x in path.read_text().splitlines()}


def test_discover_decides_on_the_report_half_against_random_and_keeps_no_incoherent_latent(
    tiny_qwen, diff_run, tmp_path
):
    base = ModelSpec(str(tiny_qwen / "model"))
    ft = ModelSpec(str(tiny_qwen / "model"), adapter=str(tiny_qwen / "lora"), merge=True)
    cfg = DiscoverConfig(pool=1, scales=(2.0, 4.0))
    run = tmp_path / "run"
    shutil.copytree(diff_run / "run", run)
    with FakeOpenAIServer(judge_fn=empty_is_incoherent) as server:
        res = discover_latents(run, base, ft, _evaluator(server, tmp_path), cfg)
        assert _ids(run / "discover" / "select" / "base" / "responses.jsonl").isdisjoint(
            _ids(run / "discover" / "report" / "base" / "responses.jsonl")
        )
        assert {f["set"] for f in res["candidates"].values()} == {"low", "high"}
        for f in res[
            "candidates"
        ].values():  # the default judge never says misaligned: no effect beyond random
            assert f["scale"] in (2.0, 4.0) and not f["passes"] and f["note"] is None
            assert f["induce"] == f["random_induce"] == 0.0 and f["random_induce_em_rate"] == 0.0
        for s in {f["scale"] for f in res["candidates"].values()}:
            for k in range(3):
                for arm in ("induce", "repair"):
                    assert (
                        run / "discover" / "report" / f"random{k}_seed0_{arm}_x{s:g}" / "em.json"
                    ).exists()
        # every decoder row along (or against) the end-of-turn embedding: one of the two arms empties the
        # answers at every scale, so no latent has a coherent scale and none is kept
        sae_dir = diff_run / "sae_eos"
        sae = load_sae(diff_run / "sae")
        eos = _eos(load_model(base))
        with torch.no_grad():
            sae.W_dec.copy_(torch.stack([(-1) ** i * eos for i in range(sae.W_dec.shape[0])]))
        save_sae(sae, sae_dir)
        run2 = tmp_path / "run2"
        shutil.copytree(diff_run / "run", run2)
        info = json.loads((run2 / "run.json").read_text())
        info["steps"]["diff"]["sae"] = str(sae_dir)  # as if the diff had run with this SAE (same ranking)
        info["steps"]["diff"]["sae_identity"] = sae_fingerprint(sae, sae_dir)
        (run2 / "run.json").write_text(json.dumps(info))
        res = discover_latents(run2, base, ft, _evaluator(server, tmp_path / "2"), cfg)
    assert (
        res["low"] == []
        and res["high"] == []
        and {f["set"] for f in res["candidates"].values()} == {"low", "high"}
    )
    for f in res["candidates"].values():
        assert f["scale"] is None and not f["passes"] and f["note"] == causal.NO_COHERENT_SCALE
        assert all(row["coherence_drop"] == 1.0 for row in f["select_sweep"].values())
    assert not (run2 / "discover" / "report").exists() or not any(
        p.name.startswith("random") for p in (run2 / "discover" / "report").iterdir()
    )


def test_neighbourhood_steer_check_runs_the_protocol(tiny_qwen, diff_run, tmp_path):
    from saediff.analyses.neighbourhood import steer_flagged

    run = tmp_path / "run"
    shutil.copytree(diff_run / "run", run)
    with FakeOpenAIServer() as server:
        st = steer_flagged(
            run,
            [1, 2],
            load_model(str(tiny_qwen / "model")),
            load_sae(diff_run / "sae"),
            _evaluator(server, tmp_path),
            scales=(0.5, 2.0),
        )
    assert set(st["latents"]) == {"1", "2"} and st["base_em_rate"] == 0.0 and st["resid_norm"] > 0
    for i, v in st["latents"].items():
        assert set(v["select_sweep"]) == {"0.5", "2"} and v["scale"] in (0.5, 2.0) and v["n_responses"] == 4
        assert len(v["random"]) == 3 and v["random_mean_em_rate"] is not None
        assert (run / "neighbourhood_steer" / "report" / f"{i}_induce_x{v['scale']:g}" / "em.json").exists()
    folder = run / "neighbourhood_steer"
    assert _ids(folder / "select" / "base" / "responses.jsonl").isdisjoint(
        _ids(folder / "report" / "base" / "responses.jsonl")
    )


def test_organism_steer_check_is_the_generic_protocol(tiny_organism, tmp_path):
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
            "2",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert r.exit_code == 0, r.output
    st = run_steer_check(tmp_path / "run", tiny_organism, n_per_domain=2, scales=(1.0, 2.0), n_latents=2)
    assert json.loads((tmp_path / "run" / "steering.json").read_text()) == json.loads(json.dumps(st))
    base = {h: tmp_path / "run" / "steering" / h / "base" / "responses.jsonl" for h in ("select", "report")}
    assert base["select"].exists() and base["report"].exists()  # the unsteered model on both draws
    asked = {h: [json.loads(x)["question"] for x in f.read_text().splitlines()] for h, f in base.items()}
    assert len(asked["select"]) == len(asked["report"]) == 12 and asked["select"] != asked["report"]
    rows = {**st["steer"], **st["steer_directions"]}
    assert len(st["steer"]) == 2 and "in_context_L1" in st["steer_directions"]
    for row in rows.values():
        assert set(row["sweep"]) == {"1", "2"}  # chosen on one draw of questions ...
        if row["coherent_scale_found"]:  # ... reported on another, beside 3 random directions of its norm
            assert (
                row["best"] == row["em_rate"] and row["best_scale"] in (1.0, 2.0) and len(row["random"]) == 3
            )
            assert row["random_same_norm"] == pytest.approx(sum(r["em_rate"] for r in row["random"]) / 3)
        else:
            assert row["best"] is None and row["note"] == causal.NO_COHERENT_SCALE


def test_commands_take_the_judge_free_pair_metric(tiny_qwen, diff_run, tmp_path):
    """``--pairs`` (a file or a shipped set) is the evaluator where no judge is given: saediff steer
    chooses and reports on its halves (within each domain), saediff eval scores a shipped set, and
    a judge together with pairs is one line."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(diff_run / "run", run)
    r = CliRunner().invoke(
        app,
        [
            "steer",
            str(run),
            "--pairs",
            "offdomain:design",
            "--scales",
            "1",
            "--latents",
            "1",
            "--random",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    em = json.loads(next((run / "steer" / "report").glob("*/em.json")).read_text())
    assert "preference" in em and em["coherence"].startswith("a proxy")
    design = {p.id for p in offdomain_pairs("design")}
    scored = {
        json.loads(x)["id"]
        for x in next((run / "steer" / "report").glob("*/pairs.jsonl")).read_text().splitlines()
    }
    assert scored and scored <= design  # the report half of the design split, never a held-out question
    r = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_qwen / "model"),
            "--pairs",
            "offdomain:heldout",
            "--out",
            str(tmp_path / "eval"),
        ],
    )
    assert r.exit_code == 0 and json.loads(r.output.splitlines()[-1])["n"] == 71, r.output
    r = CliRunner().invoke(
        app,
        [
            "steer",
            str(run),
            "--pairs",
            "medical",
            "--judge-url",
            "http://127.0.0.1:9/v1",
            "--judge-model",
            "x",
        ],
    )
    assert r.exit_code == 1 and "not both" in r.output
