"""``saediff overlap / predict / icl``: open questions of the EM literature as commands on a
diff run (thin wrappers over ``saediff.analyses``; ``saediff.cli.common.defaults`` fills in what a
known model, the organism, supplies).

    saediff overlap RUN --train-data data/bad_medical_advice.jsonl
    saediff predict RUN
    saediff icl RUN --icl-examples data/contrast.jsonl
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from saediff.cli.checks import check_choice, check_direction, run_shape
from saediff.cli.common import (
    _USER_ERRORS,
    _fail,
    _fmt,
    _int_list,
    _run_base,
    _setup,
    defaults,
)
from saediff.errors import SaediffError


def overlap_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff"),
    train_data: Path | None = typer.Option(
        None, "--train-data", help="the fine-tune's chat JSONL (organism: found from the fine-tuned folder)"
    ),
    k: int = typer.Option(8, "--k", help="principal directions per subspace"),
    layer: int | None = typer.Option(None, "--layer", help="block (default: the SAE's)"),
    n_train: int = typer.Option(256, "--n-train", help="training prompts drawn from --train-data"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Train/eval shift overlap: principal angles between the fine-tune's shifts on its data and on the run's questions.

    Activation shifts (fine-tuned minus base, last prompt token), top-k principal subspaces,
    random subspaces beside every figure; writes RUN/shift_overlap.json."""
    _setup(threads)
    from saediff.analyses.shifts import run_overlap
    from saediff.data.chat_data import load_chat_jsonl

    try:
        run_shape(run_dir, [] if layer is None else [layer], "--layer")
        train_data = train_data or defaults().training_data(_run_base(run_dir))
        if train_data is None:
            raise SaediffError("give --train-data (the fine-tune's chat JSONL)")
        load_chat_jsonl(train_data)  # a bad row named before the models load
        res = run_overlap(run_dir, train_data, k=k, layer=layer, n_train=n_train, seed=seed)
    except _USER_ERRORS as e:
        _fail(e)
    rnd = res["random_baseline"]["mean"]
    cos = ", ".join(f"{c:.2f} ({r:.2f})" for c, r in zip(res["principal_cosines"], rnd))
    sp = res["spearman_with_misaligned_rate"]
    Console().print(
        f"shift overlap at {res['hook']}, k={res['k']}, d={res['d_model']}: principal cosines (random) "
        f"{cos}\nmean-shift cosine {res['mean_shift_cosine']:.2f}; per question, Spearman with the "
        f"misaligned rate: cosine to the mean train shift {_fmt(sp['cos_to_train_mean'])}, fraction in "
        f"the train subspace {_fmt(sp['fraction_in_train_subspace'])} (random fraction "
        f"{res['random_baseline']['per_question_fraction']:.2f})\n{run_dir / 'shift_overlap.json'}"
    )


def predict_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff (with labelled answers)"),
    layers: str | None = typer.Option(None, "--layers", help="comma-separated blocks (default: the SAE's)"),
    folds: int = typer.Option(
        5,
        "--folds",
        help="cross-validation folds (whole domains held out where the "
        "prompts carry one; one per domain when there are fewer domains)",
    ),
    folds_by: str = typer.Option(
        "domain",
        "--folds-by",
        help="domain: hold out whole domains where prompts carry "
        "one, else questions; question: plain k-fold over questions",
    ),
    permutations: int = typer.Option(
        50, "--permutations", help="target permutations for the chance baseline"
    ),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Susceptibility: predict each question's misalignment after fine-tuning from the aligned model's prompt activations.

    Ridge regression, k-fold over domains (or questions), held-out R^2 and Spearman beside random
    features and permuted targets; writes RUN/susceptibility.json."""
    _setup(threads)
    from saediff.analyses.susceptibility import run_predict

    try:
        check_choice(folds_by, ("domain", "question"), "--folds-by")
        blocks = list(_int_list(layers, "--layers")) if layers else None
        run_shape(run_dir, blocks or ())
        res = run_predict(
            run_dir,
            layers=blocks,
            folds=folds,
            n_permutations=permutations,
            seed=seed,
            folds_by=folds_by,
        )
    except _USER_ERRORS as e:
        _fail(e)
    _print_predict(res)


def icl_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff"),
    icl_examples: str | None = typer.Option(
        None, "--icl-examples", help="JSONL/YAML rows question/misaligned/aligned (organism: its own)"
    ),
    max_shots: int = typer.Option(8, "--max-shots", help="in-context misaligned examples, 0..N"),
    direction: str | None = typer.Option(
        None,
        "--direction",
        help="direction name in RUN/directions (default: the response mean difference at the SAE's layer)",
    ),
    exclude_domain: str | None = typer.Option(
        None, "--exclude-domain", help="leave this domain's questions out (organism default: medical)"
    ),
    block_run: Path | None = typer.Option(
        None,
        "--block-run",
        help="a saediff block --reroute run: do in-context examples raise its rerouted latents?",
    ),
    positions: str = typer.Option(
        "response", "--positions", help="response (the fine-tune's answers, teacher-forced) | last_prompt"
    ),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Language vs fine-tune: how many in-context misaligned examples move the aligned model as far as the fine-tune.

    Projection on the persona direction after 0..N examples against the fine-tuned model's with
    none; with --block-run, whether context raises the rerouted latents; writes RUN/icl_vs_ft.json."""
    _setup(threads)
    from saediff.analyses.icl import run_icl
    from saediff.data.prompts import load_contrast_examples

    try:
        base = _run_base(run_dir)["base"]
        examples = icl_examples or defaults().icl_examples(base, seed)
        exclude_domain = exclude_domain or defaults().in_domain(base)
        if examples is None:
            raise SaediffError("give --icl-examples (rows question/misaligned/aligned)")
        check_choice(positions, ("response", "last_prompt"), "--positions")
        if isinstance(examples, str):
            load_contrast_examples(examples)
        if direction is not None:
            check_direction(direction, run_shape(run_dir), folder=run_dir / "directions")
        res = run_icl(
            run_dir,
            examples,
            max_shots=max_shots,
            direction=direction,
            exclude_domain=exclude_domain,
            block_run=block_run,
            positions=positions,
            seed=seed,
        )
    except _USER_ERRORS as e:
        _fail(e)
    _print_icl(res, run_dir)


def _print_predict(res: dict) -> None:
    """Held-out R^2 and Spearman of the prompt activations beside random features and permuted targets."""
    from rich.table import Table

    perm = res["permutation"]
    by = f"over {res['n_groups']} domain groups" if res["grouping"] == "domain" else "over questions"
    if res.get("grouping_note"):
        Console().print(f"note: {res['grouping_note']}", markup=False)
    table = Table(
        title=f"susceptibility: {res['n_questions']} questions, {res['folds']}-fold ({by}) held-out scores "
        f"(layers {res['layers']})"
    )
    for col in ("features", "R^2", "Spearman"):
        table.add_column(col)
    table.add_row("aligned model's prompt activations", _fmt(res["r2"]), _fmt(res["spearman"]))
    table.add_row(
        "random features (same shape)",
        _fmt(res["random_features"]["r2"]),
        _fmt(res["random_features"]["spearman"]),
    )
    if perm["r2"]:
        table.add_row(
            f"permuted targets, p95 of {perm['n']} (p = {perm['p_value']:.3f})",
            _fmt(perm["r2"]["p95"]),
            _fmt(perm["spearman"]["p95"]),
        )
    Console().print(table)


def _print_icl(res: dict, run_dir: Path) -> None:
    """The projection curve over shots, the shots that match the fine-tune, the rerouted latents."""
    curve = ", ".join(f"{v:.2f}" for v in res["aligned_projection_by_shots"])
    lines = [
        (
            f"projection on {res['direction']} ({res['positions']}), aligned model with 0..{res['max_shots']} "
            f"shots: {curve}; fine-tuned, no shots: {res['finetuned_projection']:.2f}"
        ),
        (
            f"shots to match the fine-tune: {res['shots_to_match_finetune']} (per question: "
            f"{res['per_question']['matched_fraction']:.0%} matched within {res['max_shots']})"
        ),
    ]
    if "rerouted" in res:
        rr = res["rerouted"]
        lines.append(f"rerouted latents {rr['latents']}: raised by context {rr['raised_by_context']}")
    Console().print("\n".join(lines) + f"\n{run_dir / 'icl_vs_ft.json'}")
