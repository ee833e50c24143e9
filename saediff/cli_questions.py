"""``saediff overlap / predict / phase / icl``: the open questions of the EM literature as commands
on a diff run (registered on the main app by ``saediff.cli``; thin wrappers over the library).

    saediff overlap RUN --train-data data/bad_medical_advice.jsonl
    saediff predict RUN
    saediff phase RUNS/plain --directions RUN/directions --judge-url URL --judge-model M
    saediff icl RUN --icl-examples data/contrast.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from saediff.cli import _USER_ERRORS, _fail, _int_list, _judge_evaluator, _organism_world, _setup, app


def _fmt(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _run_base(run_dir: Path) -> dict:
    from saediff.pipeline import read_run

    return read_run(run_dir)["steps"]["diff"]


@app.command("overlap")
def overlap_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff"),
    train_data: Optional[Path] = typer.Option(None, "--train-data", help="the fine-tune's chat JSONL (organism: "
                                              "found from the fine-tuned folder)"),
    k: int = typer.Option(8, "--k", help="principal directions per subspace"),
    layer: Optional[int] = typer.Option(None, "--layer", help="block (default: the SAE's)"),
    n_train: int = typer.Option(256, "--n-train", help="training prompts drawn from --train-data"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
) -> None:
    """Train/eval shift overlap: principal angles between the fine-tune's shifts on its data and on the run's questions.

    Activation shifts (fine-tuned minus base, last prompt token), top-k principal subspaces,
    random subspaces beside every figure; writes RUN/shift_overlap.json."""
    _setup(threads)
    from saediff.shifts import run_overlap

    try:
        if train_data is None:
            from saediff.organism.analyses import training_data_for

            info = _run_base(run_dir)
            train_data = training_data_for(info["finetuned"], info["adapter"])
            if train_data is None:
                raise ValueError("give --train-data (the fine-tune's chat JSONL)")
        res = run_overlap(run_dir, train_data, k=k, layer=layer, n_train=n_train, seed=seed)
    except _USER_ERRORS as e:
        _fail(e)
    rnd = res["random_baseline"]["mean"]
    cos = ", ".join(f"{c:.2f} ({r:.2f})" for c, r in zip(res["principal_cosines"], rnd))
    sp = res["spearman_with_misaligned_rate"]
    Console().print(f"shift overlap at {res['hook']}, k={res['k']}, d={res['d_model']}: principal cosines (random) "
                    f"{cos}\nmean-shift cosine {res['mean_shift_cosine']:.2f}; per question, Spearman with the "
                    f"misaligned rate: cosine to the mean train shift {_fmt(sp['cos_to_train_mean'])}, fraction in "
                    f"the train subspace {_fmt(sp['fraction_in_train_subspace'])} (random fraction "
                    f"{res['random_baseline']['per_question_fraction']:.2f})\n{run_dir / 'shift_overlap.json'}")


@app.command("predict")
def predict_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff (with labelled answers)"),
    layers: Optional[str] = typer.Option(None, "--layers", help="comma-separated blocks (default: the SAE's)"),
    folds: int = typer.Option(5, "--folds", help="cross-validation folds over questions"),
    permutations: int = typer.Option(50, "--permutations", help="target permutations for the chance baseline"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
) -> None:
    """Susceptibility: predict each question's misalignment after fine-tuning from the aligned model's prompt activations.

    Ridge regression, k-fold over questions, held-out R^2 and Spearman beside random features and
    permuted targets; writes RUN/susceptibility.json."""
    _setup(threads)
    from saediff.susceptibility import run_predict

    try:
        res = run_predict(run_dir, layers=list(_int_list(layers, "--layers")) if layers else None, folds=folds,
                          n_permutations=permutations, seed=seed)
    except _USER_ERRORS as e:
        _fail(e)
    from rich.table import Table

    perm = res["permutation"]
    table = Table(title=f"susceptibility: {res['n_questions']} questions, {res['folds']}-fold held-out scores "
                        f"(layers {res['layers']})")
    for col in ("features", "R^2", "Spearman"):
        table.add_column(col)
    table.add_row("aligned model's prompt activations", _fmt(res["r2"]), _fmt(res["spearman"]))
    table.add_row("random features (same shape)", _fmt(res["random_features"]["r2"]),
                  _fmt(res["random_features"]["spearman"]))
    if perm["r2"]:
        table.add_row(f"permuted targets, p95 of {perm['n']} (p = {perm['p_value']:.3f})", _fmt(perm["r2"]["p95"]),
                      _fmt(perm["spearman"]["p95"]))
    Console().print(table)


@app.command("phase")
def phase_cmd(
    checkpoints_dir: Path = typer.Argument(..., help="folder of checkpoint-N adapter folders (or a run folder with "
                                           "checkpoints/)"),
    base: Optional[str] = typer.Option(None, "--base", help="model the adapters apply to (default: the adapter's)"),
    directions: Optional[Path] = typer.Option(None, "--directions", help="a diff run's directions/ (persona candidates)"),
    module: Optional[str] = typer.Option(None, "--module", help="adapted module, e.g. model.layers.21.mlp.down_proj "
                                         "(default: the first down_proj)"),
    em: bool = typer.Option(True, "--em/--no-em", help="EM at every checkpoint (judge, or the organism's exact one)"),
    judge_url: Optional[str] = typer.Option(None, "--judge-url"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model"),
    questions: str = typer.Option("first_plot", "--questions"),
    samples: int = typer.Option(20, "--samples", help="answers per question (organism: per domain)"),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    out: Optional[Path] = typer.Option(None, "--out", help="where phase.json goes (default: CHECKPOINTS_DIR)"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
) -> None:
    """Phase transitions: when the LoRA B vector rotates vs when EM appears, over a folder of adapter checkpoints.

    Per checkpoint: local cosine, cosine with the persona candidates, norms of A and B, EM;
    writes phase.json."""
    _setup(threads)
    from saediff.phase import adapter_checkpoints, run_phase

    try:
        evaluator = None
        if em:
            from saediff.lora import read_adapter

            model = base or read_adapter(adapter_checkpoints(checkpoints_dir)[0][1]).config.get(
                "base_model_name_or_path")
            evaluator = _judge_evaluator(judge_url, judge_model, questions, samples, max_new_tokens, api_key_env,
                                         Path(out or checkpoints_dir), seed)
            if evaluator is None and model and _organism_world(model) is not None:
                from saediff.organism.evaluator import OrganismEvaluator

                evaluator = OrganismEvaluator(_organism_world(model), samples, seed)
            if evaluator is None:
                raise ValueError("EM per checkpoint needs --judge-url and --judge-model (or --no-em)")
        res = run_phase(checkpoints_dir, base=base, directions=directions, evaluator=evaluator, module=module, out=out)
    except _USER_ERRORS as e:
        _fail(e)
    from rich.table import Table

    table = Table(title=f"{res['module']}: rotation at step {res['rotation_step']}, EM at step {res['em_step']}")
    names = list(res["candidate_cosine"])
    for col in ("step", "local cos", *[f"cos {n}" for n in names], "|A|", "|B|", "EM"):
        table.add_column(col, justify="right")
    for i, step in enumerate(res["steps"]):
        table.add_row(str(step), _fmt(res["local_cosine"][i], 3), *[_fmt(res["candidate_cosine"][n][i]) for n in names],
                      _fmt(res["norm_A"][i]), _fmt(res["norm_B"][i], 3), _fmt(res["em_rate"][i]))
    Console(width=max(120, Console().width)).print(table)


@app.command("icl")
def icl_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff"),
    icl_examples: Optional[str] = typer.Option(None, "--icl-examples", help="JSONL/YAML rows question/misaligned/"
                                               "aligned (organism: its own)"),
    max_shots: int = typer.Option(8, "--max-shots", help="in-context misaligned examples, 0..N"),
    direction: Optional[str] = typer.Option(None, "--direction", help="direction name in RUN/directions (default: "
                                            "the response mean difference at the SAE's layer)"),
    exclude_domain: Optional[str] = typer.Option(None, "--exclude-domain", help="leave this domain's questions out "
                                                 "(organism default: medical)"),
    block_run: Optional[Path] = typer.Option(None, "--block-run", help="a saediff block --reroute run: do in-context "
                                             "examples raise its rerouted latents?"),
    positions: str = typer.Option("response", "--positions", help="response (the fine-tune's answers, teacher-forced)"
                                  " | last_prompt"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
) -> None:
    """Language vs fine-tune: how many in-context misaligned examples move the aligned model as far as the fine-tune.

    Projection on the persona direction after 0..N examples against the fine-tuned model's with
    none; with --block-run, whether context raises the rerouted latents; writes RUN/icl_vs_ft.json."""
    _setup(threads)
    from saediff.icl import run_icl

    try:
        examples = icl_examples
        info = _run_base(run_dir)
        if _organism_world(info["base"]) is not None:
            from saediff.organism.demo import diff_inputs

            examples = examples or diff_inputs(info["base"], seed=seed)["icl_examples"]
            exclude_domain = exclude_domain or "medical"
        if examples is None:
            raise ValueError("give --icl-examples (rows question/misaligned/aligned)")
        res = run_icl(run_dir, examples, max_shots=max_shots, direction=direction, exclude_domain=exclude_domain,
                      block_run=block_run, positions=positions, seed=seed)
    except _USER_ERRORS as e:
        _fail(e)
    curve = ", ".join(f"{v:.2f}" for v in res["aligned_projection_by_shots"])
    lines = [(f"projection on {res['direction']} ({res['positions']}), aligned model with 0..{res['max_shots']} "
              f"shots: {curve}; fine-tuned, no shots: {res['finetuned_projection']:.2f}"),
             (f"shots to match the fine-tune: {res['shots_to_match_finetune']} (per question: "
              f"{res['per_question']['matched_fraction']:.0%} matched within {res['max_shots']})")]
    if "rerouted" in res:
        rr = res["rerouted"]
        lines.append(f"rerouted latents {rr['latents']}: raised by context {rr['raised_by_context']}")
    Console().print("\n".join(lines) + f"\n{run_dir / 'icl_vs_ft.json'}")
