"""What every ``saediff`` command shares: thread setup, the one-line error path, list parsing, the
LLM-judge evaluator, and ``ModelDefaults``, through which ``saediff.cli.app`` hands the organism's inputs
to the generic commands of ``saediff.cli.questions`` (which never import the organism)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from saediff.errors import SaediffError


def _setup(threads: int | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    # one thread per process is the safe default on small shared CPUs (see DESIGN.md)
    torch.set_num_threads(threads or 1)


# errors a user can fix: saediff's own bad-input error (a bad path, file, row, key or shape, a model or
# server that cannot be reached), and the operating system's (a folder not writable, a disk full),
# which name their file. One line, exit 1. Anything else (a KeyError, a RuntimeError, an
# out-of-memory) is a bug or a resource limit and keeps its traceback.
_USER_ERRORS = (SaediffError, OSError)


def _fail(e: Exception) -> None:
    """One unwrapped line on stderr (rich would wrap it at the console width), exit 1."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and not isinstance(e, SaediffError):
        text = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else f"{type(e).__name__}: {text}"
    typer.echo(f"error: {text}", err=True)
    raise typer.Exit(1)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise SaediffError(f"{flag} takes comma-separated integers, got {text!r}") from None


PAIRS_HELP = (
    "judge-free EM: a pair file (JSONL {id, domain, question, aligned, misaligned}) or a shipped set "
    "(offdomain, offdomain:design, offdomain:heldout, medical), scored teacher-forced"
)


def _judge_evaluator(
    judge_url, judge_model, questions, samples, max_new_tokens, api_key_env, out: Path, seed: int, pairs=None
):
    """The evaluator for real models: the LLM judges at ``judge_url``, or the judge-free pair metric
    on ``pairs`` (None with neither: runs are trained, not judged)."""
    if pairs is not None:
        if judge_url is not None:
            raise SaediffError("give --judge-url (judged samples) or --pairs (scored references), not both")
        from saediff.evaluation.pairs import pair_evaluator

        return pair_evaluator(pairs)
    if judge_url is None:
        return None
    if judge_model is None:
        raise SaediffError("--judge-url needs --judge-model")
    from saediff.data.prompts import load_prompts
    from saediff.evaluation.evals import EMConfig, JudgeEvaluator
    from saediff.evaluation.judges import HttpJudge
    from saediff.evaluation.openai_api import ChatClient

    client = ChatClient(judge_url, api_key_env=api_key_env)
    judges = [
        HttpJudge(k, client, judge_model, cache_path=out / f"judge_cache_{k}.jsonl")
        for k in ("aligned", "coherent")
    ]
    return JudgeEvaluator(
        load_prompts(questions), *judges, EMConfig(samples=samples, max_new_tokens=max_new_tokens, seed=seed)
    )


class ModelDefaults:
    """What a command may fill in for a model it knows, when the user gave nothing: the generic
    answer is always None (the bodies return nothing; the user must say). ``saediff.cli.app`` passes
    the organism's."""

    def evaluator(self, model: str | None, samples: int, seed: int):
        """An EM evaluator for ``model`` without an LLM judge."""

    def training_data(self, info: dict) -> Path | None:
        """The chat JSONL the fine-tune of a diff run (``info``: its ``run.json`` step) trained on."""

    def in_domain(self, base: str) -> str | None:
        """The narrow fine-tune's domain among the run's questions."""

    def icl_examples(self, base: str, seed: int) -> list | None:
        """Contrast examples (misaligned and aligned answers) for in-context analyses."""

    def finetune(self, info: dict, full: bool, samples: int, seed: int):
        """The ``FinetuneConfig`` that reproduces the run's fine-tune."""

    def prompt_set(self, spec: str, model: str) -> list:
        """A prompt set by name: a prompt file or ``first_plot`` (a known model may add its own)."""
        from saediff.data.prompts import load_prompts

        return load_prompts(spec)
