"""The organism's causal checks of a diff run: steering the aligned model along the diff's
candidates by saediff's one protocol with the exact judge, and projecting them out of the
fine-tuned model.

    saediff steer RUN --organism DIR
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from saediff._io import atomic_write_json
from saediff.data.runs import read_run, update_run
from saediff.interventions.steer_null import NullConfig
from saediff.methods.directions import Direction, random_like
from saediff.methods.export import load_directions
from saediff.models.hooks import parse_layer
from saediff.models.loading import LoadedModel, ModelSpec, load_model
from saediff.stories.organism.evaluator import evaluate_organism_em
from saediff.stories.organism.recipes import read_organism_world

__all__ = ["run_steer_check"]


# long: its signature and docstring; the code itself is 50 lines
def run_steer_check(
    run_dir: str | Path,
    organism_dir: str | Path,
    *,
    n_per_domain: int = 50,
    n_latents: int = 3,
    kl_budget: float | None = None,
    null: NullConfig | None = None,
    seed: int = 0,
) -> dict:
    """Causal checks on the organism. Steering, by saediff's one protocol
    (``steer_protocol.select_and_report``) with the exact judge: the aligned model steered with each top
    latent and each dense candidate at the SAE's layer, priced by its KL on the organism's questions
    (``organism_cost``, at most ``kl_budget``), the cost level chosen on one draw of questions and
    the effect (paired per answer) reported on an independent draw against the null's at the same
    cost; a dense candidate of the mean-difference family brings its label-permuted estimator into
    that null where its method has one (``permuted_null`` says how, or why not). Projection: the top latent, the dense candidates and a random direction out of the
    fine-tuned model, at its layer and after every block. Writes ``steering.json``; each steering
    condition is kept under ``RUN/steering/``."""
    from saediff.interventions.steer_protocol import Arm, select_and_report
    from saediff.stories.organism.scored import ScoredOrganismEvaluator

    run_dir, organism_dir = Path(run_dir), Path(organism_dir)
    info = read_run(run_dir)["steps"]["diff"]
    dirs = load_directions(run_dir / "directions")
    world = read_organism_world(organism_dir / "aligned")
    aligned, ft = load_model(str(organism_dir / "aligned")), load_model(_finetuned(info))

    def rate(lm, ctx=contextlib.nullcontext()):
        with ctx:
            return evaluate_organism_em(lm, world, n_per_domain, seed=seed).other_misaligned_rate

    top = dirs[f"sae_{info['top_latents'][0]}"]
    L = parse_layer(top.hook)
    latents = {f"sae_{i}": dirs[f"sae_{i}"] for i in info["top_latents"][:n_latents]}
    dense = _dense(dirs, L)
    perm = _permuted_nulls(run_dir, organism_dir, info, dirs, dense, aligned, ft, L, seed)
    select, report = ScoredOrganismEvaluator(world, n_per_domain, seed).halves()
    sel = select_and_report(
        {n: d.vector for n, d in {**latents, **dense}.items()},
        [Arm("induce", aligned)],
        L,
        1.0,
        select,
        report,
        run_dir / "steering",
        organism_cost(aligned, world, kl_budget),
        null=null or NullConfig(),
        permuted={n: p.estimator for n, p in perm.items() if p.estimator is not None},
    )
    result: dict = {
        "base_other_misaligned": rate(aligned),
        "finetuned_other_misaligned": rate(ft),
        "protocol": "cost level (KL on the organism's questions) chosen on one question draw (sweep), "
        "the effect on another (best) against the null at the same cost",
        "base_report_other_misaligned": sel.unsteered["induce"]["report"]["em_rate"],
        "costs": sel.costs,
        "steer": {n: _steered(sel, n, L) for n in latents},
        "steer_directions": {n: _steered(sel, n, L) for n in dense},
    }
    for n, p in perm.items():  # how each mean difference's labels were permuted, or why they were not
        result["steer_directions"][n]["permuted_null"] = p.note
    # project each candidate out of the fine-tuned model at its layer (and a random control)
    candidates = {"top_sae_latent": top, "random_like_top": random_like(top, seed=seed), **dense}
    result["project_out"] = _projected(ft, candidates, L, rate, result["finetuned_other_misaligned"])
    atomic_write_json(run_dir / "steering.json", result)
    update_run(run_dir, "steer_check", {"file": "steering.json"})
    return result


def _finetuned(info: dict) -> ModelSpec:
    """The diff run's fine-tuned model (``info``: its ``diff`` step), an adapter merged into its base."""
    return ModelSpec(
        info["finetuned"] or info["base"], adapter=info["adapter"], merge=info["adapter"] is not None
    )


def _dense(dirs: dict[str, Direction], L: int) -> dict[str, Direction]:
    """The dense candidates of the diff run at block ``L`` (those it has)."""
    return {
        key: dirs[key]
        for key in (
            f"mean_diff_models_L{L}",
            f"mean_diff_responses_L{L}",
            f"in_context_L{L}",
            f"ground_truth_L{L}",
        )
        if key in dirs
    }


def _permuted_nulls(run_dir, organism_dir, info, dirs, dense, aligned, ft, L: int, seed: int) -> dict:
    """The label-permuted null of each dense candidate of the mean-difference family (name ->
    ``PermutedNull``), by the head-to-head's method code on the models already loaded; the in-context
    direction rebuilt from the organism's contrast examples (``diff_inputs``, the diff's seed taken
    to be ``seed``). The response mean difference has one answer per question here, so no pairing
    to permute: its note says so."""
    from saediff.methods.base import MethodConfig, MethodInputs
    from saediff.methods.mean_diff import diff_run_methods, diff_run_nulls
    from saediff.stories.organism.inputs import diff_inputs

    methods = diff_run_methods(dense, L)
    if not methods:
        return {}
    contrast = (
        diff_inputs(organism_dir / "aligned", seed=seed)["icl_examples"] if "in_context" in methods else []
    )
    inputs = MethodInputs(aligned, ft, L, [], contrast, MethodConfig(seed=seed), {}, dirs, info, run_dir)
    return {n: p for n, p in diff_run_nulls(inputs, methods).items() if n in dense}


def _steered(sel, name: str, L: int) -> dict:
    """One candidate's steering figures (``sel``: the protocol's ``SteerSelection``): the select
    sweep's EM per scale, the report EM at the chosen scale (``best``) beside the random directions'."""
    from saediff.interventions.steer_protocol import induce_summary

    s = induce_summary(sel.candidates[name])
    return {
        "layer": L,
        **s,
        "sweep": {k: (r.get("induce") or {}).get("em_rate") for k, r in s["select_sweep"].items()},
        "best": s["em_rate"],
        "best_scale": s["scale"],
    }


ORGANISM_KL_BUDGET = 0.1
"""nats per question token: the organism's default steering budget (chosen on design seeds, docs)"""


def organism_cost(lm: LoadedModel, world, budget: float | None = None, n_per_domain: int = 8):
    """The organism's steering cost: KL on its questions as user turns alone (a question does not
    depend on the persona its answers carry), ``n_per_domain`` per domain from a fixed draw."""
    import numpy as np

    from saediff.evaluation.neutral import neutral_user_turns
    from saediff.interventions.steer_protocol import CostConfig

    rng = np.random.default_rng(7)
    qs = [" ".join(world.sample_question(rng, d)) for d in world.domains for _ in range(n_per_domain)]
    return CostConfig(neutral_user_turns(lm, qs, "the organism's questions"), budget or ORGANISM_KL_BUDGET)


def _projected(
    ft: LoadedModel, candidates: dict[str, Direction], L: int, rate, base_rate: float
) -> dict[str, dict]:
    """Each candidate projected out of the fine-tuned model ``ft`` at block ``L`` and after every
    block: the other-domain EM (``rate(lm, ctx)``) and its cut relative to ``base_rate``."""
    from saediff.interventions.steering import project_out

    def cut(r: float) -> float | None:
        return (1 - r / base_rate) if base_rate else None

    out = {}
    # at the candidate's own layer, and after every block (directional ablation: later layers
    # cannot rebuild the direction from what earlier ones wrote)
    for name, d in candidates.items():
        r, r_all = (
            rate(ft, project_out(ft.model, L, d.vector)),
            rate(ft, project_out(ft.model, "all", d.vector)),
        )
        out[name] = {
            "other_misaligned": r,
            "relative_cut": cut(r),
            "all_layers_other_misaligned": r_all,
            "all_layers_relative_cut": cut(r_all),
        }
    return out
