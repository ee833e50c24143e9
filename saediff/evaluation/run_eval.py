"""What ``saediff eval`` runs: LLM judges (or a given ``Evaluator``, or the judge-free pair figures),
evaluate, write files."""

from __future__ import annotations

from pathlib import Path

from saediff.data.prompts import load_prompts
from saediff.errors import SaediffError
from saediff.evaluation.evals import (
    EMConfig,
    Evaluator,
    LocalGenerator,
    RemoteGenerator,
    evaluate_em,
    evaluate_once,
)
from saediff.evaluation.judges import HttpJudge, load_judge_prompts
from saediff.evaluation.openai_api import ChatClient
from saediff.evaluation.pairs import pair_evaluator
from saediff.models.loading import ModelSpec, load_model

__all__ = ["judge_set", "run_eval"]


# long by its 20 options (saediff eval's flags); the body is some 40 lines
def run_eval(
    *,
    model: str,
    out: Path,
    adapter: str | None = None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    questions: str = "first_plot",
    samples: int = 50,
    max_new_tokens: int = 600,
    gen_url: str | None = None,
    gen_model: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    gen_api_key_env: str | None = None,
    concurrency: int = 16,
    rubric: bool = False,
    dtype: str = "auto",
    seed: int = 0,
    evaluator: Evaluator | None = None,
    pairs: str | Path | None = None,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    judge_prompts: str | Path | None = None,
    judge_constrain: bool = False,
) -> dict:
    """Evaluate and write ``out/responses.jsonl`` + ``out/em.json``; returns em.json's content.
    ``evaluator`` (e.g. the organism's exact judge) replaces the LLM judges when there is no
    ``judge_url``. ``api_key_env`` names the judge's key; the generation server at ``gen_url``
    gets only ``gen_api_key_env``'s (none by default), never the judge's.

    ``pairs`` (a pair file) instead scores its aligned and misaligned reference answers under the
    local model, ``batch_size`` conversations per forward, without a judge (``saediff.evaluation.pairs``):
    ``out/pairs.jsonl`` + ``out/em.json``, with provenance, reused by a rerun of the same setup.

    ``temperature`` 0 is greedy (locally and on a server); ``judge_prompts`` a YAML file of judge
    templates (``load_judge_prompts``); ``judge_constrain`` holds the judges' replies to a number or
    label (``HttpJudge``'s ``constrain``)."""
    if pairs is not None:
        return _run_pairs(
            model,
            adapter,
            dtype,
            Path(out),
            pairs,
            batch_size,
            judge_url=judge_url,
            gen_url=gen_url,
            rubric=rubric,
        )
    if gen_url and adapter:
        raise SaediffError(
            f"--adapter {adapter} applies to local generation only; with --gen-url serve the adapter "
            "there (e.g. vLLM --lora-modules NAME=PATH) and pass --gen-model NAME"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if evaluator is not None and judge_url is None:
        return evaluator(load_model(ModelSpec(model, adapter=adapter, dtype=dtype)), out)
    if judge_url is None or judge_model is None:
        raise SaediffError(
            "--judge-url and --judge-model are required for models other than the saediff organism"
        )
    judges = judge_set(
        judge_url,
        judge_model,
        api_key_env,
        out,
        concurrency=concurrency,
        rubric=rubric,
        prompts=judge_prompts,
        constrain=judge_constrain,
    )
    prompts = load_prompts(questions)  # a bad file is one line before a model loads
    generator = (
        RemoteGenerator(ChatClient(gen_url, api_key_env=gen_api_key_env), gen_model or model, concurrency)
        if gen_url
        else LocalGenerator(load_model(ModelSpec(model, adapter=adapter, dtype=dtype)))
    )
    cfg = EMConfig(
        samples=samples, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p
    )
    report = evaluate_em(
        generator,
        prompts,
        judges["aligned"],
        judges["coherent"],
        cfg,
        out,
        rubric=judges.get("rubric"),
    )
    return report.to_json()


def judge_set(
    judge_url: str,
    judge_model: str,
    api_key_env: str,
    out: Path,
    *,
    concurrency: int = 8,
    rubric: bool = False,
    prompts: str | Path | None = None,
    constrain: bool = False,
) -> dict[str, HttpJudge]:
    """The ``aligned`` and ``coherent`` LLM judges (and ``rubric``), one client, each with its
    answer cache under ``out``, templates from ``prompts`` (a YAML file) or the shipped ones."""
    templates = load_judge_prompts(prompts) if prompts is not None else {}
    if rubric and prompts is not None and "rubric" not in templates:
        raise SaediffError(f"--rubric with --judge-prompts {prompts}: the file has no rubric template")
    judge_client = ChatClient(judge_url, api_key_env=api_key_env)
    return {
        k: HttpJudge(
            k,
            judge_client,
            judge_model,
            concurrency=concurrency,
            cache_path=out / f"judge_cache_{k}.jsonl",
            template=templates.get(k),
            constrain=constrain,
        )
        for k in ("aligned", "coherent", *(("rubric",) if rubric else ()))
    }


def _run_pairs(
    model: str,
    adapter: str | None,
    dtype: str,
    out: Path,
    pairs: str | Path,
    batch_size: int,
    *,
    judge_url: str | None,
    gen_url: str | None,
    rubric: bool,
) -> dict:
    """``saediff eval --pairs``: the judge-free pair figures through ``evaluate_once``."""
    if judge_url:
        raise SaediffError(
            "--pairs scores fixed reference answers without a judge: drop --judge-url (or drop "
            "--pairs to judge sampled answers)"
        )
    if gen_url:
        raise SaediffError(
            "--pairs scores the answers' likelihoods under the local model: drop --gen-url (a "
            "generation server does not score given answers)"
        )
    if rubric:
        raise SaediffError("--rubric grades sampled answers and --pairs samples none: give one of them")
    evaluator = pair_evaluator(pairs, batch_size)
    spec = ModelSpec(model, adapter=adapter, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    return evaluate_once(evaluator, lambda: load_model(spec), out, "eval", spec=spec)
