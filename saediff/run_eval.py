"""What ``saediff eval`` runs: LLM judges (or a given ``Evaluator``), evaluate, write files."""

from __future__ import annotations

from pathlib import Path

from saediff.evals import EMConfig, Evaluator, LocalGenerator, RemoteGenerator, evaluate_em
from saediff.judges import HttpJudge
from saediff.models import ModelSpec, load_model
from saediff.openai_api import ChatClient
from saediff.prompts import load_prompts
from saediff.errors import SaediffError

__all__ = ["run_eval"]


def run_eval(*, model: str, out: Path, adapter: str | None = None, judge_url: str | None = None,
             judge_model: str | None = None, questions: str = "first_plot", samples: int = 50,
             max_new_tokens: int = 600, gen_url: str | None = None, gen_model: str | None = None,
             api_key_env: str = "OPENAI_API_KEY", gen_api_key_env: str | None = None, concurrency: int = 16,
             rubric: bool = False, dtype: str = "auto", seed: int = 0, evaluator: Evaluator | None = None) -> dict:
    """Evaluate and write ``out/responses.jsonl`` + ``out/em.json``; returns em.json's content.
    ``evaluator`` (e.g. the organism's exact judge) replaces the LLM judges when there is no
    ``judge_url``. ``api_key_env`` names the judge's key; the generation server at ``gen_url``
    gets only ``gen_api_key_env``'s (none by default), never the judge's."""
    if gen_url and adapter:
        raise SaediffError(f"--adapter {adapter} applies to local generation only; with --gen-url serve the adapter "
                           "there (e.g. vLLM --lora-modules NAME=PATH) and pass --gen-model NAME")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if evaluator is not None and judge_url is None:
        return evaluator(load_model(ModelSpec(model, adapter=adapter, dtype=dtype)), out)
    if judge_url is None or judge_model is None:
        raise SaediffError("--judge-url and --judge-model are required for models other than the saediff organism")
    judge_client = ChatClient(judge_url, api_key_env=api_key_env)
    judges = {k: HttpJudge(k, judge_client, judge_model, concurrency=concurrency,
                           cache_path=out / f"judge_cache_{k}.jsonl")
              for k in ("aligned", "coherent", *(("rubric",) if rubric else ()))}
    if gen_url:
        generator = RemoteGenerator(ChatClient(gen_url, api_key_env=gen_api_key_env), gen_model or model, concurrency)
    else:
        generator = LocalGenerator(load_model(ModelSpec(model, adapter=adapter, dtype=dtype)))
    cfg = EMConfig(samples=samples, max_new_tokens=max_new_tokens, seed=seed)
    report = evaluate_em(generator, load_prompts(questions), judges["aligned"], judges["coherent"], cfg, out,
                         rubric=judges.get("rubric"))
    return report.to_json()
