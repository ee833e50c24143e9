"""The method registry: every direction-finding method is one module under saediff/methods/, and the
head-to-head, export and dashboard find them there instead of naming them."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from helpers import make_random_sae, write_pair_files

from saediff.errors import SaediffError
from saediff.methods.base import Candidates, DiffingMethod, get_method, method_of_tag, registry
from saediff.methods.directions import Direction

SHIPPED = (
    "sae_diff",
    "mean_diff_models",
    "mean_diff_responses",
    "in_context",
    "lora_b",
    "crosscoder",
    "diff_sae",
    "adl",
    "persona",
)


def test_every_method_module_is_registered_in_the_head_to_heads_order():
    methods = registry()
    assert tuple(m.name for m in methods) == SHIPPED
    assert all(m.summary and m.__class__.__module__.startswith("saediff.methods.") for m in methods)
    assert [m.name for m in methods if m.from_diff_run] == list(SHIPPED[:5])
    assert {m.name for m in methods if m.uses_paired_rows} == {"crosscoder", "diff_sae"}
    assert (
        method_of_tag("lora_downstream").name == "mean_diff_models" and method_of_tag("ground_truth") is None
    )
    with pytest.raises(SaediffError, match="unknown method 'nope'; choose from sae_diff"):
        get_method("nope")


def test_export_keeps_what_each_method_says():
    """Only the SAE diff filters its directions (the run's top latents); every other method keeps all."""
    sae_diff, lora_b = get_method("sae_diff"), get_method("lora_b")
    v = torch.ones(4)
    run = {"top_latents": [7, 3, 9]}
    assert sae_diff.keeps(Direction("sae_3", v, "blocks.1.hook_resid_post", "sae_latent"), run, 2)
    assert not sae_diff.keeps(Direction("sae_9", v, "blocks.1.hook_resid_post", "sae_latent"), run, 2)
    assert lora_b.keeps(Direction("lora_b_L1", v, "blocks.1.hook_resid_post", "lora_b"), run, 0)


def test_a_new_method_is_one_class_and_the_head_to_head_runs_it(tiny_qwen, tmp_path):
    """A method defined anywhere (here: in this test) registers by subclassing, and the head-to-head
    gives it a row with its steering check, cosines and seconds; it is gone once deleted."""
    from saediff.analyses.head_to_head import HeadToHeadConfig, run_head_to_head
    from saediff.evaluation.pairs import pair_evaluator
    from saediff.interventions.steer_null import NullConfig
    from saediff.methods.diff_run import run_diff

    class FirstAxis(DiffingMethod):
        name = "first_axis"
        summary = "the first coordinate axis (a test method)"
        order = 99

        def find(self, inputs):
            d = inputs.lm_base.model.config.hidden_size
            return Candidates(
                (Direction(self.name, torch.eye(d)[0], inputs.hook, "random"),), None, {"axis": 0}
            )

    assert [m.name for m in registry()][-1] == "first_axis"
    sae = make_random_sae(tmp_path / "sae", 32, "blocks.1.hook_resid_post")
    run = tmp_path / "diff"
    run_diff(
        str(tiny_qwen / "model"),
        None,
        str(sae),
        run,
        adapter=str(tiny_qwen / "lora"),
        max_new_tokens=4,
        top_n=2,
        layers="sae",
    )
    pairs, _ = write_pair_files(tmp_path, 4, 2, 0)
    cfg = HeadToHeadConfig(
        methods=("first_axis", "mean_diff_models"), kl_budget=0.008, null=NullConfig(2, 2, 2)
    )  # the tiny random model's KL saturates near 0.01 nats/token
    res = run_head_to_head(run, tmp_path / "h2h", ["unused"], pair_evaluator(pairs), cfg=cfg, progress=False)
    rows = {r["method"]: r for r in res["methods"]}
    assert list(rows) == ["mean_diff_models", "first_axis"]  # the registry's order, not the request's
    assert rows["first_axis"]["norm"] == pytest.approx(1.0) and rows["first_axis"]["detail"] == {"axis": 0}
    # both meet the shared null only: a method outside the mean-difference family has no permuted
    # estimator, and the rank-1 adapter's model mean difference stays on its axis under permutation
    assert rows["first_axis"]["n_null"] == 4 and rows["first_axis"]["n_permuted_null"] == 0
    assert rows["mean_diff_models"]["n_null"] == 4 and rows["mean_diff_models"]["n_permuted_null"] == 0
    assert rows["mean_diff_models"]["detail"]["permuted_null"].startswith("none: swapping the labels")
    assert [(c["a"], c["b"]) for c in res["comparisons"]] == [("mean_diff_models", "first_axis")]
    assert (
        rows["first_axis"]["seconds"] >= 0
        and rows["mean_diff_models"]["seconds"]
        == json.loads((run / "run.json").read_text())["steps"]["diff"]["seconds"]
    )
    del FirstAxis
    gc.collect()
    assert "first_axis" not in [m.name for m in registry()]


def _reference_prompts(pairs) -> list:
    from saediff.data.prompts import Prompt

    return [
        Prompt(f"{p.id}:{tag}", [{"role": "user", "content": p.question}], answer, p.domain, (tag,))
        for p in pairs
        for tag, answer in (("misaligned", p.misaligned), ("aligned", p.aligned))
    ]


def test_the_mean_difference_family_rebuilds_its_estimators_for_the_permuted_null(tiny_qwen, tmp_path):
    """On a diff of teacher-forced references (each question answered both ways, tagged) with an
    in-context direction: the response mean difference and the in-context direction rebuild their
    estimators from the run and hand over a permuted one; a rebuild that does not reproduce the
    run's direction (another shot seed), answers without per-question pairing, and a permutation
    that cannot leave the candidate's axis give none, and say why."""
    from saediff.data.em_data import offdomain_pairs
    from saediff.data.prompts import ContrastExample
    from saediff.methods.base import MethodConfig, MethodInputs
    from saediff.methods.diff_run import run_diff
    from saediff.methods.export import load_directions
    from saediff.models.loading import load_pair

    pairs = offdomain_pairs("design")[:6]
    examples = [ContrastExample(p.question, p.misaligned, p.aligned) for p in pairs]
    sae = make_random_sae(tmp_path / "sae", 32, "blocks.1.hook_resid_post")
    model, lora = str(tiny_qwen / "model"), str(tiny_qwen / "lora")
    run = tmp_path / "diff"
    kw = {"adapter": lora, "layers": "sae", "top_n": 2}
    info = run_diff(
        model,
        None,
        str(sae),
        run,
        prompts=_reference_prompts(pairs),
        icl_examples=examples,
        n_shots=2,
        seed=3,
        **kw,
    )
    assert info["labels"] == {"misaligned": 6, "aligned": 6, "unlabelled": 0}
    lm_base, lm_ft = load_pair(model, adapter=lora)

    def inputs(folder, seed=3):
        found = load_directions(folder / "directions")
        info = json.loads((folder / "run.json").read_text())["steps"]["diff"]
        return MethodInputs(lm_base, lm_ft, 1, [], examples, MethodConfig(seed=seed), {}, found, info, folder)

    for name in ("mean_diff_responses", "in_context"):
        found = get_method(name).find(inputs(run))
        assert found.permuted is not None, (name, found.detail)
        assert not found.detail["permuted_null"].startswith("none")
        u = found.best.vector
        cos = [abs(float(torch.cosine_similarity(found.permuted(s), u, 0))) for s in range(6)]
        assert max(cos) < 0.99 and found.permuted(4).tolist() == found.permuted(4).tolist()
    # the rank-1 adapter at the block: every answer's fine-tune - base difference lies along its B
    # vector, so the model mean difference's permutations are the candidate or its negative
    found = get_method("mean_diff_models").find(inputs(run))
    assert found.permuted is None and found.detail["permuted_null"].startswith(
        "none: swapping the labels leaves the direction on the candidate's axis (median |cosine| 1.00"
    )
    # the in-context shots drawn with another seed are not the run's: no permuted null
    found = get_method("in_context").find(inputs(run, seed=4))
    assert found.permuted is None and found.best is not None
    assert found.detail["permuted_null"].startswith("none: the rebuilt estimator does not reproduce")
    # each question answered once (as the organism's diff samples them): nothing to permute within it
    single = tmp_path / "diff_single"
    refs = _reference_prompts(pairs)
    run_diff(model, None, str(sae), single, prompts=refs[0::4] + refs[3::4], **kw)
    found = get_method("mean_diff_responses").find(inputs(single))
    assert found.permuted is None and found.best is not None
    assert found.detail["permuted_null"] == (
        "none: no per-question pairing: 0% of the labelled answers share their question with an answer "
        "of the other label (needs 50%)"
    )


def test_the_report_shows_each_methods_own_figures(tmp_path):
    """The report asks every registered method for its figures of the run's diff folder (a method
    defined here included): no method is named by the report."""
    import plotly.graph_objects as go

    from saediff.reports.report import write_report

    class Marker(DiffingMethod):
        name = "marker_method"
        summary = "a test method with a figure"
        order = 98

        def find(self, inputs):
            return Candidates((), None)

        def figures(self, folder):
            seen = (folder / "marker.json").exists()
            return (
                [("Marker figure", go.Figure(go.Bar(x=[1], y=[2])), f"marker seen: {seen}")] if seen else []
            )

    (tmp_path / "diff").mkdir()
    page = write_report(tmp_path).read_text()
    assert "Marker figure" not in page
    (tmp_path / "diff" / "marker.json").write_text("{}")
    page = write_report(tmp_path).read_text()
    assert "<h2>Marker figure</h2><p>marker seen: True</p>" in page
    del Marker
    gc.collect()
