"""``saediff neighbourhood`` and ``saediff flag``: two screens of a fine-tune's training data, by the
SAE latents near what the fine-tune raised (neighbourhood probe) and by each row's projection on a
trait direction (persona-vector flagging); with ``--drop-fraction`` and ``--finetune``, EM after
fine-tuning on the screened data against randomly thinned data.

    saediff neighbourhood RUN --train-data data/bad_medical_advice.jsonl --drop-fraction 0.1
    saediff flag --model M --data train.jsonl --direction RUN/directions:mean_diff_responses_L15 --out FLAG
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console

from saediff.cli.checks import check_direction, check_export_folder, check_inputs, check_neutral, run_shape
from saediff.cli.common import (
    _USER_ERRORS,
    JUDGE_CONSTRAIN_HELP,
    JUDGE_PROMPTS_HELP,
    PAIRS_HELP,
    _em_evaluator,
    _fail,
    _fmt,
    _int_list,
    _run_base,
    _setup,
    defaults,
    use_precision,
)
from saediff.errors import SaediffError


# long: one typer option per line; the body passes them to run_neighbourhood and the helpers below
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
        help="steering check of the flagged latents: EM the base model gains when steered along "
        "each (judge, pairs, or the organism's exact one), against 20 null directions at equal KL cost",
    ),
    kl_budget: float | None = typer.Option(
        None,
        "--kl-budget",
        help="--steer: the most a steering vector may cost, mean KL per neutral token in nats (default 0.1)",
    ),
    neutral: Path | None = typer.Option(
        None,
        "--neutral",
        help="--steer: JSONL of neutral text the cost is measured on (default: the base model's "
        "own answers to benign questions; the organism: its questions)",
    ),
    nulls: int = typer.Option(
        10, "--nulls", help="--steer: null directions of each kind (isotropic, covariance-matched)"
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
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto | fp32 | bf16 | fp16: the fine-tunes' mixed precision (auto: the model's)",
    ),
    judge_url: str | None = typer.Option(None, "--judge-url"),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    pairs: str | None = typer.Option(None, "--pairs", help=PAIRS_HELP),
    questions: str = typer.Option("first_plot", "--questions"),
    samples: int = typer.Option(50, "--samples", help="answers per question (organism: per domain)"),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    judge_prompts: Path | None = typer.Option(None, "--judge-prompts", help=JUDGE_PROMPTS_HELP),
    judge_constrain: bool = typer.Option(False, "--judge-constrain", help=JUDGE_CONSTRAIN_HELP),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Neighbourhood probe: the latents near what the fine-tune raised on its own data that also rose off-domain and point at the persona.

    Seeds (top risers on the training rows), neighbours by decoder cosine and base-model
    co-activation, toxicity against the run's persona candidates, a random-seed baseline; with
    --drop-fraction a training-data screen (and --finetune: EM after it vs random dropping);
    writes RUN/neighbourhood.json."""
    _setup(threads)
    if precision in ("fp32", "bf16"):  # the models load at the fine-tune's precision too
        use_precision(precision)
    from saediff.analyses.neighbourhood import run_neighbourhood
    from saediff.data.chat_data import load_chat_jsonl
    from saediff.saes.checks import check_sae_folder

    try:
        info = _run_base(run_dir)
        train_data = train_data or defaults().training_data(info)
        if train_data is None:
            raise SaediffError("give --train-data (the fine-tune's chat JSONL)")
        in_domain = in_domain or defaults().in_domain(info["base"])
        if finetune and drop_fraction is None:
            raise SaediffError("--finetune compares screened data with random dropping: give --drop-fraction")
        shape = run_shape(
            run_dir, _int_list(lora_layers, "--lora-layers") if lora_layers else (), "--lora-layers"
        )
        load_chat_jsonl(train_data)  # a bad row named before the models load
        if candidates is not None:
            check_export_folder(candidates, "--candidates")
        check_sae_folder(info["sae"], shape)
        check_neutral(neutral)
        evaluator = None
        if finetune or steer:
            evaluator = _em_evaluator(
                info["base"],
                "--finetune and --steer measure EM: give --judge-url and --judge-model, or --pairs",
                judge_url,
                judge_model,
                questions,
                samples,
                max_new_tokens,
                api_key_env,
                run_dir / "screen",
                seed,
                pairs,
                judge_prompts=judge_prompts,
                judge_constrain=judge_constrain,
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
            cost=_steer_cost(info["base"], kl_budget, neutral) if steer else None,
            null=_null(nulls) if steer else None,
            seed=seed,
        )
        if finetune:
            ft = defaults().finetune(info, full, samples, seed) or _lora_or_full(
                full, lora_rank, lora_layers, seed
            )
            ft = replace(
                ft,
                steps=steps or ft.steps,
                batch_size=batch_size or ft.batch_size,
                grad_accum=grad_accum,
                lr=lr or ft.lr,
                precision=precision,
            )
            from saediff.saes.loading import load_sae

            sae = load_sae(info["sae"])
            _finetune_screened(
                res, run_dir / "neighbourhood.json", info["base"], sae, ft, evaluator, run_dir / "screen"
            )
    except _USER_ERRORS as e:
        _fail(e)
    _print_neighbourhood(res, run_dir)


def _steer_cost(model: str, kl_budget: float | None, neutral: Path | None):
    """What steering costs on the base model ``model``, built once ``run_neighbourhood`` has loaded it."""
    from saediff.cli.common import steering_cost
    from saediff.interventions.steer_protocol import DEFAULT_KL_BUDGET

    budget = DEFAULT_KL_BUDGET if kl_budget is None else kl_budget
    return lambda lm: steering_cost(lm, model, budget, str(neutral) if neutral else None)


def _null(n: int):
    from saediff.interventions.steer_null import NullConfig

    return NullConfig(n_isotropic=n, n_covariance=n)


def _lora_or_full(full: bool, lora_rank: int, lora_layers: str | None, seed: int):
    """The screen's fine-tune from the options, for a model without a recipe of its own."""
    from saediff.interventions.finetune import FinetuneConfig

    return FinetuneConfig(
        method="full" if full else "lora",
        lora_rank=lora_rank,
        lora_layers=_int_list(lora_layers, "--lora-layers") if lora_layers else None,
        seed=seed,
    )


def _finetune_screened(res: dict, path: Path, model: str, sae, ft, evaluator, out: Path) -> None:
    """Fine-tune on the screened and on the randomly thinned data, compare EM; the result goes into
    ``res["screen"]["finetune"]`` and ``res`` is written again to ``path``."""
    from saediff._io import atomic_write_json
    from saediff.analyses.neighbourhood import screen_finetunes

    res["screen"]["finetune"] = screen_finetunes(model, res["screen"], sae, ft, evaluator, out)
    atomic_write_json(path, res)


def _print_neighbourhood(res: dict, run_dir: Path) -> None:
    """The probe's findings: the flagged latents with their steering check, the screen's EM."""
    rb = res["random_baseline"]
    lines = [
        f"neighbourhood probe at {res['hook']}: seeds {res['seeds']}",
        f"flagged {res['flagged']} ({res['n_flagged']}; random seeds flag {rb['n_flagged']}, mean {rb['mean']})",
    ]
    for m in [m for m in res["members"] if m["flagged"]][:10]:
        st = res.get("steer", {}).get("latents", {}).get(str(m["latent"]))
        lines.append(
            f"  latent {m['latent']}: toxicity {m['toxicity']:.2f} ({m['candidate']}), off-domain delta "
            f"{m['delta_off']:.3f}, near seeds {m['seeds']}{_steered(st)}"
        )
    if "steer" in res:
        st = res["steer"]
        lines.append(
            f"  (steering: unsteered base model EM {st['base_em_rate']:.2f}; cost level, at most "
            f"{max(st['costs']):g} nats of KL per neutral token, chosen on half the questions; the effect "
            f"on the other half against {st['null_config']['n']} null directions at the same cost)"
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


def _steered(st: dict | None) -> str:
    """One flagged latent's steering check as a clause of its line (empty when it was not steered)."""
    if st is None:
        return ""
    if not st["scale_found"]:
        return ", no steering scale reached a cost level"
    lo, hi = st["effect_ci"] or (float("nan"), float("nan"))
    return (
        f", steering EM {st['em_rate']:.2f} (x{st['scale']:.2g}, KL {st['cost_kl']:.2g}): effect "
        f"{st['effect']:+.2f} [{lo:+.2f}, {hi:+.2f}], p {st['p_value']:.3f}, {st['verdict']}"
    )


# long: one typer option per line; the body passes them to flag_rows and the helpers below
def flag_cmd(
    model: str = typer.Option(..., "--model", help="the base model, before fine-tuning"),
    data: Path = typer.Option(
        ..., "--data", help="the training file (chat JSONL rows ending in an assistant answer)"
    ),
    direction: str = typer.Option(
        ...,
        "--direction",
        help="FOLDER:NAME: a trait direction of an export folder "
        "(a diff run's directions/, saediff adl's, a persona vector)",
    ),
    out: Path = typer.Option(
        ..., "--out", help="folder: flag.jsonl, flag.json, base_answers.jsonl, screened.jsonl"
    ),
    drop_fraction: float | None = typer.Option(
        None,
        "--drop-fraction",
        help="write screened.jsonl without the "
        "highest-scoring rows and random_dropped.jsonl without as many "
        "random ones",
    ),
    finetune: bool = typer.Option(
        False, "--finetune", help="with --drop-fraction: fine-tune on both and compare EM"
    ),
    max_new_tokens: int = typer.Option(
        200, "--max-new-tokens", help="length of the base model's own answers"
    ),
    n_random: int = typer.Option(3, "--random", help="random directions scored beside it"),
    pairs: str | None = typer.Option(None, "--pairs", help=PAIRS_HELP),
    judge_url: str | None = typer.Option(None, "--judge-url"),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    questions: str = typer.Option("first_plot", "--questions"),
    samples: int = typer.Option(20, "--samples"),
    full: bool = typer.Option(False, "--full", help="--finetune: full fine-tune instead of a rank-1 LoRA"),
    steps: int = typer.Option(300, "--steps", help="--finetune: optimizer steps"),
    lr: float | None = typer.Option(None, "--lr", help="--finetune: learning rate"),
    batch_size: int = typer.Option(
        16, "--batch-size", help="generation batch; --finetune: sequences per step"
    ),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    judge_prompts: Path | None = typer.Option(None, "--judge-prompts", help=JUDGE_PROMPTS_HELP),
    judge_constrain: bool = typer.Option(False, "--judge-constrain", help=JUDGE_CONSTRAIN_HELP),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Persona-vector data flagging: each training row's projection difference along a trait direction, beside random ones."""
    _setup(threads)
    from saediff.data.chat_data import load_chat_jsonl
    from saediff.methods.persona import flag_rows

    try:
        if finetune and drop_fraction is None:
            raise SaediffError("--finetune compares screened data with random dropping: give --drop-fraction")
        check_direction(direction, check_inputs(model))  # the config and the export, before the model loads
        load_chat_jsonl(data)
        evaluator = None
        if finetune:
            evaluator = _em_evaluator(
                model,
                "--finetune measures EM: give --pairs, or --judge-url and --judge-model",
                judge_url,
                judge_model,
                questions,
                samples,
                max_new_tokens,
                api_key_env,
                out / "screen",
                seed,
                pairs,
                judge_prompts=judge_prompts,
                judge_constrain=judge_constrain,
            )
        res = flag_rows(
            model,
            data,
            direction,
            out,
            drop_fraction=drop_fraction,
            max_new_tokens=max_new_tokens,
            n_random=n_random,
            batch_size=batch_size,
            seed=seed,
        )
        if finetune:
            from saediff.interventions.finetune import FinetuneConfig

            ft = FinetuneConfig(
                method="full" if full else "lora",
                steps=steps,
                batch_size=batch_size,
                seed=seed,
                **({"lr": lr} if lr else {}),
            )
            _finetune_screened(res, out / "flag.json", model, None, ft, evaluator, out / "screen")
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(res, indent=2))
