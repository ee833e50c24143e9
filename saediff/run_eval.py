"""What ``saediff eval`` runs: pick the organism's exact judge or LLM judges, evaluate, write files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from saediff._io import atomic_write_json, atomic_write_jsonl
from saediff.evals import EMConfig, LocalGenerator, RemoteGenerator, evaluate_em, evaluate_organism_em, wilson_interval
from saediff.judges import HttpJudge
from saediff.models import ModelSpec, load_model
from saediff.openai_api import ChatClient
from saediff.organism.recipes import read_organism_world
from saediff.prompts import load_prompts

__all__ = ["run_eval"]


def run_eval(*, model: str, out: Path, adapter: str | None = None, judge_url: str | None = None,
             judge_model: str | None = None, questions: str = "first_plot", samples: int = 50,
             max_new_tokens: int = 600, gen_url: str | None = None, gen_model: str | None = None,
             api_key_env: str = "OPENAI_API_KEY", concurrency: int = 16, rubric: bool = False,
             dtype: str = "auto", seed: int = 0) -> dict:
    """Evaluate and write ``out/responses.jsonl`` + ``out/em.json``; returns em.json's content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = read_organism_world(model) if Path(model).exists() else None
    if world is not None and judge_url is None:
        return _organism_eval(model, adapter, out, world, samples, seed)
    if judge_url is None or judge_model is None:
        raise ValueError("--judge-url and --judge-model are required for models other than the saediff organism")
    judge_client = ChatClient(judge_url, api_key_env=api_key_env)
    judges = {k: HttpJudge(k, judge_client, judge_model, concurrency=concurrency,
                           cache_path=out / f"judge_cache_{k}.jsonl")
              for k in ("aligned", "coherent", *(("rubric",) if rubric else ()))}
    if gen_url:
        generator = RemoteGenerator(ChatClient(gen_url, api_key_env=api_key_env), gen_model or model, concurrency)
    else:
        generator = LocalGenerator(load_model(ModelSpec(model, adapter=adapter, dtype=dtype)))
    cfg = EMConfig(samples=samples, max_new_tokens=max_new_tokens, seed=seed)
    report = evaluate_em(generator, load_prompts(questions), judges["aligned"], judges["coherent"], cfg, out,
                         rubric=judges.get("rubric"))
    return report.to_json()


def _organism_eval(model: str, adapter: str | None, out: Path, world, samples: int, seed: int) -> dict:
    lm = load_model(ModelSpec(model, adapter=adapter))
    em = evaluate_organism_em(lm, world, samples, seed=seed, progress=True)
    others = [r for r in em.responses if r["domain"] != "medical"]
    k = sum(r["misaligned"] for r in others)
    result = {"em_rate": em.other_misaligned_rate, "em_rate_ci": list(wilson_interval(k, len(others))),
              "coherent_rate": float(np.mean([r["covered"] for r in em.responses])),
              "n_responses": len(em.responses), "per_question": em.misaligned_rate,
              "judge": "organism_exact", "note": "em_rate: non-medical domains; coherent_rate: answer coverage"}
    atomic_write_jsonl(out / "responses.jsonl", em.responses)
    atomic_write_json(out / "em.json", result)
    return result
