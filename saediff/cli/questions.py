"""``saediff neighbourhood / overlap / predict / phase / icl / dashboard``: the open questions of
the EM literature as commands on a diff run (``register`` adds them to the main app; thin wrappers
over the library).

    saediff neighbourhood RUN --train-data data/bad_medical_advice.jsonl --drop-fraction 0.1
    saediff overlap RUN --train-data data/bad_medical_advice.jsonl
    saediff predict RUN
    saediff phase RUNS/plain --directions RUN/directions --judge-url URL --judge-model M
    saediff icl RUN --icl-examples data/contrast.jsonl
    saediff dashboard RUN
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from saediff.cli.common import (
    _USER_ERRORS,
    PAIRS_HELP,
    ModelDefaults,
    _fail,
    _int_list,
    _judge_evaluator,
    _setup,
)
from saediff.errors import SaediffError

_defaults = ModelDefaults()
"""what the commands fill in for models they know (``register`` sets it: the organism's, from saediff.cli.app)"""


def _fmt(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _run_base(run_dir: Path) -> dict:
    from saediff.data.runs import read_run

    return read_run(run_dir)["steps"]["diff"]


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

    try:
        train_data = train_data or _defaults.training_data(_run_base(run_dir))
        if train_data is None:
            raise SaediffError("give --train-data (the fine-tune's chat JSONL)")
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
        res = run_predict(
            run_dir,
            layers=list(_int_list(layers, "--layers")) if layers else None,
            folds=folds,
            n_permutations=permutations,
            seed=seed,
            folds_by=folds_by,
        )
    except _USER_ERRORS as e:
        _fail(e)
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


def phase_cmd(
    checkpoints_dir: Path = typer.Argument(
        ..., help="folder of checkpoint-N adapter folders (or a run folder with checkpoints/)"
    ),
    base: str | None = typer.Option(
        None, "--base", help="model the adapters apply to (default: the adapter's)"
    ),
    directions: Path | None = typer.Option(
        None, "--directions", help="a diff run's directions/ (persona candidates)"
    ),
    module: str | None = typer.Option(
        None,
        "--module",
        help="adapted module, e.g. model.layers.21.mlp.down_proj (default: the first down_proj)",
    ),
    em: bool = typer.Option(
        True, "--em/--no-em", help="EM at every checkpoint (judge, or the organism's exact one)"
    ),
    judge_url: str | None = typer.Option(None, "--judge-url"),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    pairs: str | None = typer.Option(None, "--pairs", help=PAIRS_HELP),
    questions: str = typer.Option("first_plot", "--questions"),
    samples: int = typer.Option(20, "--samples", help="answers per question (organism: per domain)"),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    out: Path | None = typer.Option(None, "--out", help="where phase.json goes (default: CHECKPOINTS_DIR)"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Phase transitions: when the LoRA B vector rotates vs when EM appears, over a folder of adapter checkpoints.

    Per checkpoint: local cosine, cosine with the persona candidates, norms of A and B, EM;
    writes phase.json."""
    _setup(threads)
    from saediff.analyses.phase import adapter_checkpoints, run_phase

    try:
        evaluator, model = None, base
        if em:
            from saediff.models.lora import read_adapter

            model = base or read_adapter(adapter_checkpoints(checkpoints_dir)[0][1]).config.get(
                "base_model_name_or_path"
            )
            evaluator = _judge_evaluator(
                judge_url,
                judge_model,
                questions,
                samples,
                max_new_tokens,
                api_key_env,
                Path(out or checkpoints_dir),
                seed,
                pairs=pairs,
            ) or _defaults.evaluator(model, samples, seed)
            if evaluator is None:
                raise SaediffError(
                    "EM per checkpoint needs --judge-url and --judge-model, or --pairs (or --no-em)"
                )
        res = run_phase(
            checkpoints_dir, base=model, directions=directions, evaluator=evaluator, module=module, out=out
        )
    except _USER_ERRORS as e:
        _fail(e)
    from rich.table import Table

    table = Table(
        title=f"{res['module']}: rotation at step {res['rotation_step']}, EM at step {res['em_step']}"
    )
    names = list(res["candidate_cosine"])
    for col in ("step", "local cos", *[f"cos {n}" for n in names], "|A|", "|B|", "EM"):
        table.add_column(col, justify="right")
    for i, step in enumerate(res["steps"]):
        table.add_row(
            str(step),
            _fmt(res["local_cosine"][i], 3),
            *[_fmt(res["candidate_cosine"][n][i]) for n in names],
            _fmt(res["norm_A"][i]),
            _fmt(res["norm_B"][i], 3),
            _fmt(res["em_rate"][i]),
        )
    Console(width=max(120, Console().width)).print(table)


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

    try:
        base = _run_base(run_dir)["base"]
        examples = icl_examples or _defaults.icl_examples(base, seed)
        exclude_domain = exclude_domain or _defaults.in_domain(base)
        if examples is None:
            raise SaediffError("give --icl-examples (rows question/misaligned/aligned)")
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


def neighbourhood_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff"),
    train_data: Path | None = typer.Option(
        None, "--train-data", help="the fine-tune's chat JSONL (organism: found from the fine-tuned folder)"
    ),
    in_domain: str | None = typer.Option(
        None,
        "--in-domain",
        help="the fine-tune's domain: its questions are left "
        "out of the off-domain set (organism default: medical)",
    ),
    n_seeds: int = typer.Option(10, "--seeds", help="latents that rose most on the training data"),
    n_neighbours: int = typer.Option(
        5, "--neighbours", help="neighbours per seed, by decoder cosine and by co-activation each"
    ),
    n_random: int = typer.Option(5, "--random", help="draws of random seeds for the baseline"),
    candidates: Path | None = typer.Option(
        None, "--candidates", help="export folder of persona candidates (default: the run's directions)"
    ),
    methods: str = typer.Option(
        "in_context,mean_diff_responses", "--methods", help="candidate methods that score toxicity"
    ),
    n_train: int = typer.Option(256, "--n-train", help="training rows read for the seeds"),
    drop_fraction: float | None = typer.Option(
        None,
        "--drop-fraction",
        help="training-data screen: drop this share of rows that fire the flagged latents most",
    ),
    finetune: bool = typer.Option(
        False,
        "--finetune",
        help="with --drop-fraction: fine-tune on the screened and on "
        "the randomly thinned data and compare EM",
    ),
    steer: bool = typer.Option(
        False,
        "--steer",
        help="steering check of the flagged latents: EM of the base model "
        "steered along each (judge, or the organism's exact one)",
    ),
    full: bool = typer.Option(False, "--full", help="--finetune: full fine-tune instead of LoRA"),
    lora_rank: int = typer.Option(1, "--lora-rank"),
    lora_layers: str | None = typer.Option(
        None, "--lora-layers", help="comma-separated blocks (default: all)"
    ),
    steps: int | None = typer.Option(None, "--steps", help="optimizer steps (default 300)"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr: float | None = typer.Option(None, "--lr"),
    precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 | fp16"),
    judge_url: str | None = typer.Option(None, "--judge-url"),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    pairs: str | None = typer.Option(None, "--pairs", help=PAIRS_HELP),
    questions: str = typer.Option("first_plot", "--questions"),
    samples: int = typer.Option(50, "--samples", help="answers per question (organism: per domain)"),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Neighbourhood probe: the latents near what the fine-tune raised on its own data that also rose off-domain and point at the persona.

    Seeds (top risers on the training rows), neighbours by decoder cosine and base-model
    co-activation, toxicity against the run's persona candidates, a random-seed baseline; with
    --drop-fraction a training-data screen (and --finetune: EM after it vs random dropping);
    writes RUN/neighbourhood.json."""
    _setup(threads)
    from dataclasses import replace

    from saediff.analyses.neighbourhood import run_neighbourhood, screen_finetunes

    try:
        info = _run_base(run_dir)
        train_data = train_data or _defaults.training_data(info)
        if train_data is None:
            raise SaediffError("give --train-data (the fine-tune's chat JSONL)")
        in_domain = in_domain or _defaults.in_domain(info["base"])
        if finetune and drop_fraction is None:
            raise SaediffError("--finetune compares screened data with random dropping: give --drop-fraction")
        evaluator = None
        if finetune or steer:
            evaluator = _judge_evaluator(
                judge_url,
                judge_model,
                questions,
                samples,
                max_new_tokens,
                api_key_env,
                run_dir / "screen",
                seed,
                pairs=pairs,
            ) or _defaults.evaluator(info["base"], samples, seed)
            if evaluator is None:
                raise SaediffError(
                    "--finetune and --steer measure EM: give --judge-url and --judge-model, or --pairs"
                )
        res = run_neighbourhood(
            run_dir,
            train_data,
            in_domain=in_domain,
            n_train=n_train,
            n_seeds=n_seeds,
            n_neighbours=n_neighbours,
            n_random=n_random,
            candidates=candidates,
            candidate_methods=tuple(methods.split(",")),
            drop_fraction=drop_fraction,
            evaluator=evaluator if steer else None,
            seed=seed,
        )
        if finetune:
            from saediff.interventions.finetune import FinetuneConfig
            from saediff.saes.loading import load_sae

            ft = _defaults.finetune(info, full, samples, seed) or FinetuneConfig(
                method="full" if full else "lora",
                lora_rank=lora_rank,
                lora_layers=_int_list(lora_layers, "--lora-layers") if lora_layers else None,
                seed=seed,
            )
            ft = replace(
                ft,
                steps=steps or ft.steps,
                batch_size=batch_size or ft.batch_size,
                grad_accum=grad_accum,
                lr=lr or ft.lr,
                precision=precision,
            )
            res["screen"]["finetune"] = screen_finetunes(
                info["base"], res["screen"], load_sae(info["sae"]), ft, evaluator, run_dir / "screen"
            )
            from saediff._io import atomic_write_json

            atomic_write_json(run_dir / "neighbourhood.json", res)
    except _USER_ERRORS as e:
        _fail(e)
    _print_neighbourhood(res, run_dir)


def _print_neighbourhood(res: dict, run_dir: Path) -> None:
    """The probe's findings: the flagged latents with their steering check, the screen's EM."""
    rb = res["random_baseline"]
    lines = [
        f"neighbourhood probe at {res['hook']}: seeds {res['seeds']}",
        f"flagged {res['flagged']} ({res['n_flagged']}; random seeds flag {rb['n_flagged']}, mean {rb['mean']})",
    ]
    for m in [m for m in res["members"] if m["flagged"]][:10]:
        st = res.get("steer", {}).get("latents", {}).get(str(m["latent"]))
        steered = (
            ""
            if st is None
            else ", no coherent steering scale"
            if st["em_rate"] is None
            else (
                f", steering EM {st['em_rate']:.2f} (x{st['scale']:g}; random {st['random_mean_em_rate']:.2f})"
            )
        )
        lines.append(
            f"  latent {m['latent']}: toxicity {m['toxicity']:.2f} ({m['candidate']}), off-domain delta "
            f"{m['delta_off']:.3f}, near seeds {m['seeds']}{steered}"
        )
    if "steer" in res:
        lines.append(
            f"  (unsteered base model EM {res['steer']['base_em_rate']:.2f}; steering scale chosen on half "
            "the questions, EM on the other half)"
        )
    if "screen" in res:
        sc = res["screen"]
        lines.append(f"screen: dropped {sc['n_dropped']} of {sc['n_rows']} rows -> {sc['screened']}")
        if "finetune" in sc:
            f = sc["finetune"]
            lines.append(
                f"EM after fine-tuning: screened {_fmt(f['screened']['em_rate'])}, random drop "
                f"{_fmt(f['random_dropped']['em_rate'])} ({f['steps']} steps each)"
            )
    Console().print("\n".join(lines) + f"\n{run_dir / 'neighbourhood.json'}")


def dashboard_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff or saediff crosscoder diff"),
    out: Path | None = typer.Option(None, "--out", help="HTML file (default: RUN/dashboard.html)"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Feature dashboards: one self-contained HTML page with a Neuronpedia-style card per latent the diff carded, both models side by side.

    Top activations with context in the base and the fine-tuned model, activation histograms before
    and after, logit effects, decoder neighbours, cosines with the dense candidates."""
    _setup(threads)
    from saediff.reports.dashboard import write_dashboard

    try:
        path = write_dashboard(run_dir, out)
    except _USER_ERRORS as e:
        _fail(e)
    Console().print(str(path))


def register(app: typer.Typer, defaults: ModelDefaults | None = None) -> None:
    """Add the open-question commands to ``app``; ``defaults`` fills in what a known model (the
    organism, from saediff.cli.app) supplies when the user does not."""
    global _defaults
    _defaults = defaults or ModelDefaults()
    app.command("overlap")(overlap_cmd)
    app.command("predict")(predict_cmd)
    app.command("phase")(phase_cmd)
    app.command("icl")(icl_cmd)
    app.command("neighbourhood")(neighbourhood_cmd)
    app.command("dashboard")(dashboard_cmd)
