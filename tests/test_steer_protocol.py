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
from saediff.interventions.steer_null import NullConfig
from saediff.models.hooks import capture_resid
from saediff.models.loading import ModelSpec, load_model
from saediff.saes.loading import load_sae

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


def _cost(lm, tmp_path, budget: float = 0.006):
    """KL on the tiny model's greedy answers to 6 benign questions (its KL saturates near 0.015)."""
    from saediff.evaluation.neutral import neutral_answers, neutral_questions
    from saediff.interventions.steer_protocol import CostConfig

    qs = [q["question"] for q in neutral_questions()[:6]]
    return CostConfig(neutral_answers(lm, qs, max_new_tokens=8, cache_dir=tmp_path / "neutral"), budget)


SMALL_NULL = NullConfig(n_isotropic=3, n_covariance=3)


def test_protocol_prices_by_kl_chooses_on_one_half_and_reports_against_the_null(tiny_qwen, tmp_path):
    from saediff.interventions.steer_protocol import Arm, select_and_report

    lm = load_model(str(tiny_qwen / "model"))
    with torch.no_grad():
        x0 = capture_resid(lm.model, [1], IDS)[1]
    rand = torch.randn(x0.shape[-1], generator=torch.Generator().manual_seed(3))
    log: list = []
    cost = _cost(lm, tmp_path)
    with FakeOpenAIServer(judge_fn=empty_is_incoherent) as server:
        select, report = Probed(_evaluator(server, tmp_path), x0, log).halves()
        sel = select_and_report(
            {"eos": 7.0 * _eos(lm), "rand": rand},
            [Arm("induce", lm)],
            1,
            0.5,
            select,
            report,
            tmp_path / "steer",
            cost,
            null=SMALL_NULL,
        )
        n_measured = len(log)
        again = select_and_report(  # a rerun measures nothing again (conditions and KL points cached)
            {"eos": 7.0 * _eos(lm), "rand": rand}, [Arm("induce", lm)], 1, 0.5, select, report,
            tmp_path / "steer", cost, null=SMALL_NULL,
        )  # fmt: skip
    assert len(log) == n_measured and again.candidates["rand"].cost_kl == sel.candidates["rand"].cost_kl
    ref = sel.unsteered["induce"]
    assert ref["select"]["coherent_rate"] == 1.0 and ref["report"]["n_responses"] == 4  # 4 of the 8 questions
    assert sel.costs == [0.0015, 0.003, 0.006] and sel.null_config["n"] == 6
    for c in sel.candidates.values():
        assert c.passed and c.scale_abs == pytest.approx(c.scale * 0.5)
        assert set(c.select_sweep) == {"0.0015", "0.003", "0.006"}
        for level, row in c.select_sweep.items():  # every level costs what it names, within the search's 5%
            assert row["cost_kl"] == pytest.approx(float(level), rel=0.05)
        best = max(c.select_sweep, key=lambda k: c.select_sweep[k]["effect"])
        assert c.cost_kl == c.select_sweep[best]["cost_kl"]  # the level with the largest select-half effect
        # the default judge never says misaligned: no effect, and the null's is 0 as well
        assert c.effect == 0.0 and c.p_value == 1.0 and not c.beats_null and c.verdict == "fails"
        assert len(c.null) == 6 and all(
            v["cost_kl"] == pytest.approx(float(best), rel=0.05) for v in c.null.values()
        )
    asked = {h: {q for c in log if c["half"] == h for q in c["questions"]} for h in ("select", "report")}
    assert len(asked["select"]) == 4 and not asked["select"] & asked["report"]
    assert asked["select"] | asked["report"] == {p.id for p in load_prompts("first_plot")}
    assert all(c["questions"] == asked[c["half"]] for c in log)
    report_conditions = {c["condition"] for c in log if c["half"] == "report"}
    for name, c in sel.candidates.items():
        best = f"{c.cost_kl:g}"
        assert any(x.startswith(f"{name}_c") for x in report_conditions)
    assert sum(x.startswith("null_") for x in report_conditions) >= 6  # the null, on the report half only
    assert not any(c["condition"].startswith("null_") for c in log if c["half"] == "select")
    scales = {
        **{
            f"{n}_c{k}_induce": r["scale_abs"]
            for n, c in sel.candidates.items()
            for k, r in c.select_sweep.items()
        }
    }
    for c in log:  # every steered condition adds a vector of the norm the search found
        if c["condition"] in scales:
            assert c["added_norm"] == pytest.approx(scales[c["condition"]], rel=1e-4), c


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


def test_discover_decides_on_the_report_half_against_the_null_in_both_arms(tiny_qwen, diff_run, tmp_path):
    base = ModelSpec(str(tiny_qwen / "model"))
    ft = ModelSpec(str(tiny_qwen / "model"), adapter=str(tiny_qwen / "lora"), merge=True)
    cfg = DiscoverConfig(pool=1, kl_budget=0.006, levels=(0.5, 1.0), null=SMALL_NULL)
    run = tmp_path / "run"
    shutil.copytree(diff_run / "run", run)
    with FakeOpenAIServer(judge_fn=empty_is_incoherent) as server:
        cost = lambda lm: _cost(lm, tmp_path)
        res = discover_latents(run, base, ft, _evaluator(server, tmp_path), cfg, cost=cost)
    assert _ids(run / "discover" / "select" / "base" / "responses.jsonl").isdisjoint(
        _ids(run / "discover" / "report" / "base" / "responses.jsonl")
    )
    assert {f["set"] for f in res["candidates"].values()} == {"low", "high"}
    assert res["costs"] == [0.003, 0.006]
    for f in res[
        "candidates"
    ].values():  # the default judge never says misaligned: nothing holds, nothing kept
        assert f["cost_kl"] == pytest.approx(0.003, rel=0.05) or f["cost_kl"] == pytest.approx(
            0.006, rel=0.05
        )
        assert f["induce"] == f["repair"] == 0.0 and f["induce_p_value"] == f["repair_p_value"] == 1.0
        assert f["induce_verdict"] == f["repair_verdict"] == "fails" and not f["passes"]
    assert res["low"] == [] and res["high"] == []
    report = {p.name for p in (run / "discover" / "report").iterdir()}
    for arm in ("induce", "repair"):  # the null measured in both arms, on the report half only
        assert sum(n.startswith("null_") and n.endswith(arm) for n in report) >= 6
    assert not any(p.name.startswith("null_") for p in (run / "discover" / "select").iterdir())


def test_neighbourhood_steer_check_runs_the_protocol(tiny_qwen, diff_run, tmp_path):
    from saediff.analyses.neighbourhood import steer_flagged
    from saediff.interventions.causal import chat_cost

    run = tmp_path / "run"
    shutil.copytree(diff_run / "run", run)
    lm = load_model(str(tiny_qwen / "model"))
    with FakeOpenAIServer() as server:
        st = steer_flagged(
            run,
            [1, 2],
            lm,
            load_sae(diff_run / "sae"),
            _evaluator(server, tmp_path),
            cost=chat_cost(lm, 0.008, levels=(0.5, 1.0)),
            null=NullConfig(n_isotropic=2, n_covariance=2),
        )
    assert set(st["latents"]) == {"1", "2"} and st["base_em_rate"] == 0.0 and st["resid_norm"] > 0
    for i, v in st["latents"].items():
        assert set(v["select_sweep"]) == {"0.004", "0.008"} and v["scale_found"] and v["n_responses"] == 4
        assert (
            len(v["null"]) == 4 and v["p_value"] == 1.0 and v["verdict"] == "fails"
        )  # nothing is misaligned
        level = next(k for k, r in v["select_sweep"].items() if r["cost_kl"] == v["cost_kl"])
        assert (run / "neighbourhood_steer" / "report" / f"{i}_c{level}_induce" / "em.json").exists()
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
    st = run_steer_check(
        tmp_path / "run", tiny_organism, n_per_domain=2, n_latents=2, kl_budget=0.01, null=SMALL_NULL
    )
    assert json.loads((tmp_path / "run" / "steering.json").read_text()) == json.loads(json.dumps(st))
    base = {h: tmp_path / "run" / "steering" / h / "base" / "responses.jsonl" for h in ("select", "report")}
    assert base["select"].exists() and base["report"].exists()  # the unsteered model on both draws
    asked = {h: [json.loads(x)["question"] for x in f.read_text().splitlines()] for h, f in base.items()}
    assert len(asked["select"]) == len(asked["report"]) == 12 and asked["select"] != asked["report"]
    em = json.loads((tmp_path / "run" / "steering" / "report" / "base" / "em.json").read_text())
    assert len(em["scores"]) == 10  # one item per non-medical answer (5 domains x 2)
    rows = {**st["steer"], **st["steer_directions"]}
    assert (
        len(st["steer"]) == 2
        and "in_context_L1" in st["steer_directions"]
        and st["costs"] == [0.0025, 0.005, 0.01]
    )
    assert all(row["scale_found"] for row in rows.values())
    for row in rows.values():
        assert set(row["sweep"]) == {"0.0025", "0.005", "0.01"}  # chosen on one draw of questions ...
        if row["scale_found"]:  # ... reported on another, against 6 null directions at its cost
            permuted = (
                row.get("permuted_null") == "the two contexts of each question swapped with probability 1/2"
            )
            n_null = 6 + 10 * permuted  # the in-context direction adds its label-permuted estimates
            assert row["best"] == row["em_rate"] and len(row["null"]) == n_null
            assert row["p_value"] == pytest.approx(
                (1 + sum(v["effect"] >= row["effect"] for v in row["null"].values())) / (1 + n_null)
            )
            assert row["verdict"] in ("holds", "fails", "inconclusive")
        else:
            assert row["best"] is None and row["note"] == causal.NO_SCALE


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
            "--kl-budget",
            "0.006",
            "--latents",
            "1",
            "--nulls",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    steer = json.loads((run / "steer.json").read_text())
    assert all(v["scale_found"] and v["p_value"] is not None for v in steer["induce"].values())
    for per in steer["remove"].values():  # ablations read as the shift over the base model that survives them
        f = per["layer"]
        assert f["removed"] == pytest.approx(f["shift"] - f["surviving"]) and f["n"] > 1
        assert f["shift"] != 0.0 and len(f["null_removed"]) == 5 and 1 / 6 <= f["p_value"] <= 1.0
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


def test_steer_takes_any_exported_direction_on_several_pair_sets(tiny_qwen, diff_run, tmp_path):
    """``saediff steer --direction FOLDER:NAME`` runs any export folder's directions through the same
    protocol, once per pair set, and steer.json holds each verdict with its cost, p-value, the null's
    quantiles and seeds; a direction that is not in the folder is one line."""
    from saediff.methods.export import load_directions

    names = sorted(load_directions(diff_run / "run" / "directions"))
    dense = next(n for n in names if not n.startswith("sae_"))
    args = ["steer", "--model", str(tiny_qwen / "model"), "--kl-budget", "0.006", "--nulls", "2"]
    sets = ["--pairs", "offdomain:heldout", "--pairs", "style_crossed"]
    directions = [
        "--direction",
        f"{diff_run / 'run' / 'directions'}:{dense}",
        "--direction",
        f"{diff_run / 'run' / 'directions'}:sae_0",
    ]
    r = CliRunner().invoke(app, [*args, *directions, *sets, "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "out" / "steer.json").read_text())
    assert set(res["directions"]) == {dense, "sae_0"} and res["costs"] == [0.0015, 0.003, 0.006]
    for name in (dense, "sae_0"):
        for pair_set in ("offdomain:heldout", "style_crossed"):
            row = res["directions"][name][pair_set]
            assert set(row) >= {
                "effect",
                "effect_ci",
                "cost_kl",
                "scale",
                "p_value",
                "beats_null",
                "null_quantiles",
            }
            assert row["p_value"] in (
                pytest.approx(k / 5) for k in range(1, 6)
            )  # 4 nulls: p in {0.2, ..., 1}
            assert row["beats_null"] == (row["p_value"] <= 0.05)
            assert (
                sorted(v["kind"] for v in row["null_seeds"].values())
                == ["covariance"] * 2 + ["isotropic"] * 2
            )
    r = CliRunner().invoke(
        app,
        [
            *args,
            "--direction",
            f"{diff_run / 'run' / 'directions'}:nope",
            *sets,
            "--out",
            str(tmp_path / "o2"),
        ],
    )
    assert r.exit_code == 1 and "nope" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o2").exists()
    r = CliRunner().invoke(
        app,
        [*args, "--direction", f"{diff_run / 'run' / 'directions'}:{dense}", "--out", str(tmp_path / "o3")],
    )
    assert r.exit_code == 1 and "--pairs" in r.output


def test_steer_direction_on_the_organism_uses_its_exact_judge(tiny_organism, tmp_path):
    """``saediff steer --model ORGANISM/aligned --direction ...`` with no judge and no pairs: the
    organism's exact judge and its own cost (KL on its questions)."""
    from saediff.methods.directions import Direction
    from saediff.methods.export import export_directions

    v = torch.randn(32, generator=torch.Generator().manual_seed(5))
    export_directions([Direction("probe", v, "blocks.1.hook_resid_post", "random")], tmp_path / "exp")
    args = ["steer", "--model", str(tiny_organism / "aligned"), "--direction", f"{tmp_path / 'exp'}:probe"]
    r = CliRunner().invoke(
        app, [*args, "--samples", "2", "--kl-budget", "0.01", "--nulls", "1", "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "o" / "steer.json").read_text())
    row = res["directions"]["probe"]["organism"]
    assert res["neutral"] == "the organism's questions" and res["costs"] == [0.0025, 0.005, 0.01]
    assert (
        row["p_value"] in (pytest.approx(k / 3) for k in (1, 2, 3)) and row["n"] == 10
    )  # 5 domains x 2 answers
