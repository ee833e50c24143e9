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
    cfg = HeadToHeadConfig(methods=("first_axis", "mean_diff_models"), scales=(1.0,), n_random=2)
    res = run_head_to_head(run, tmp_path / "h2h", ["unused"], pair_evaluator(pairs), cfg=cfg, progress=False)
    rows = {r["method"]: r for r in res["methods"]}
    assert list(rows) == ["mean_diff_models", "first_axis"]  # the registry's order, not the request's
    assert rows["first_axis"]["norm"] == pytest.approx(1.0) and rows["first_axis"]["detail"] == {"axis": 0}
    assert (
        rows["first_axis"]["seconds"] >= 0
        and rows["mean_diff_models"]["seconds"]
        == json.loads((run / "run.json").read_text())["steps"]["diff"]["seconds"]
    )
    del FirstAxis
    gc.collect()
    assert "first_axis" not in [m.name for m in registry()]


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
