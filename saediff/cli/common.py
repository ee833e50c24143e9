"""What every ``saediff`` command shares: logging and thread setup, the quiet console, the one-line
error path, list parsing, the LLM-judge evaluator, the options of the base/fine-tune pair, and
``ModelDefaults``, through which ``saediff.cli.app`` hands the organism's inputs to the generic
commands (``questions``, ``screen``, ``methods``, ``crosscoder``: they never import the organism)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from saediff.console import StderrHandler
from saediff.errors import SaediffError

PRECISION_HELP = (
    "auto | fp32 | bf16: the model side's arithmetic (bf16 autocast over float32 weights); auto: bf16 "
    "where the device multiplies bf16 natively, fp32 for the EM model organism (or set SAEDIFF_PRECISION)"
)


def use_precision(precision: str) -> None:
    """What ``auto`` means for every model this command (and its worker processes) loads."""
    from saediff.models.precision import CHOICES, ENV

    if precision not in CHOICES:
        raise SaediffError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        os.environ[ENV] = precision


def with_precision(command):
    """``command`` with a ``--precision`` option (``PRECISION_HELP``) applied before it runs: every
    model-side command takes one, the library reads it through ``ModelSpec.precision="auto"``."""
    import functools
    import inspect

    sig = inspect.signature(command, eval_str=True)
    option = inspect.Parameter(
        "precision",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option("auto", "--precision", help=PRECISION_HELP),
        annotation=str,
    )

    @functools.wraps(command)
    def run(*args, precision: str = "auto", **kwargs):
        try:
            use_precision(precision)
        except SaediffError as e:
            _fail(e)
        return command(*args, **kwargs)

    run.__signature__ = sig.replace(parameters=[*sig.parameters.values(), option])
    run.__annotations__ = {**command.__annotations__, "precision": str}
    return run


def is_verbose() -> bool:
    """``saediff --verbose`` or ``SAEDIFF_VERBOSE=1``: third-party bars, warnings and logs shown."""
    return os.environ.get("SAEDIFF_VERBOSE", "").lower() not in ("", "0", "false", "no")


def quiet_third_party() -> None:
    """Silence what saediff's commands do not say themselves, through the libraries' own switches:
    transformers' logging and its weight-loading bars, huggingface_hub's download bars, and the
    Future-, Deprecation- and UserWarnings of the libraries underneath (saediff logs, never warns)."""
    import sys
    import warnings

    categories = (FutureWarning, DeprecationWarning, UserWarning)
    for category in categories:
        warnings.filterwarnings("ignore", category=category)
    # the libraries read these switches when first imported: here (a command imports them lazily, so
    # start-up does not pay for it) and in the worker processes the demos spawn; a value the user set is kept
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow it
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("PYTHONWARNINGS", ",".join(f"ignore::{c.__name__}" for c in categories))
    if (
        "transformers" in sys.modules or "huggingface_hub" in sys.modules
    ):  # already imported (a notebook, a test runner): switch it directly
        import huggingface_hub.utils
        import transformers.utils.logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def _setup(threads: int | None) -> None:
    """saediff's log on stderr (INFO; other libraries' from WARNING up unless verbose), and torch's
    CPU threads."""
    root = logging.getLogger()
    if not root.handlers:  # else whoever runs the command (pytest, a notebook) has configured logging
        handler = StderrHandler()  # lines go above saediff.console's live display, not through it
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO if is_verbose() else logging.WARNING)
        logging.getLogger("saediff").setLevel(logging.INFO)
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


def _need_ft(finetuned, adapter) -> None:
    if finetuned is None and adapter is None:
        raise SaediffError("give --finetuned or --adapter")


# the base / fine-tune pair, as the method commands (crosscoder, adl) take it
_BASE = typer.Option(..., "--base", help="base (aligned) model folder, hub name or GGUF")
_FT = typer.Option(None, "--finetuned", help="fine-tuned model (or --adapter)")
_ADAPTER = typer.Option(None, "--adapter", help="PEFT adapter folder on --base")
_PROMPTS = typer.Option(
    ...,
    "--prompts",
    help="prompt file (chat JSONL; rows with an answer are read teacher-forced), "
    "first_plot, or organism[:N] on the organism",
)
_POSITIONS = typer.Option("response", "--positions", help="all | response | last_prompt: the tokens read")


def _fmt(v, digits: int = 2) -> str:
    """A number for a table cell: ``digits`` decimals, n/a for None."""
    return "n/a" if v is None else f"{v:.{digits}f}"


def _run_base(run_dir: Path) -> dict:
    """The ``diff`` step of a run folder's run.json: its base, fine-tune, adapter and SAE."""
    from saediff.data.runs import read_run

    return read_run(run_dir)["steps"]["diff"]


JUDGE_PROMPTS_HELP = (
    "YAML of judge templates: aligned, coherent (and rubric), each with {question} and {answer}; "
    "or an EM repository's question file with judge_prompts"
)
JUDGE_CONSTRAIN_HELP = (
    "hold the judges' replies to a number (or CODE / REFUSAL) with the server's structured outputs "
    "(vLLM), for small local judges; scores are then conditional on a numeric reply"
)
PAIRS_HELP = (
    "judge-free EM: a pair file (JSONL {id, domain, question, aligned, misaligned}) or a shipped set "
    "(offdomain, offdomain:design, offdomain:heldout, medical, style_crossed), scored teacher-forced"
)


def _judge_evaluator(
    judge_url,
    judge_model,
    questions,
    samples,
    max_new_tokens,
    api_key_env,
    out: Path,
    seed: int,
    pairs=None,
    *,
    judge_prompts=None,
    judge_constrain: bool = False,
):
    """The evaluator for real models: the LLM judges at ``judge_url`` (templates from
    ``judge_prompts``, replies constrained with ``judge_constrain``), or the judge-free pair metric
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
    from saediff.evaluation.run_eval import judge_set

    judges = judge_set(
        judge_url, judge_model, api_key_env, out, prompts=judge_prompts, constrain=judge_constrain
    )
    return JudgeEvaluator(
        load_prompts(questions),
        judges["aligned"],
        judges["coherent"],
        EMConfig(samples=samples, max_new_tokens=max_new_tokens, seed=seed),
    )


def _em_evaluator(
    model,
    missing: str,
    judge_url,
    judge_model,
    questions,
    samples,
    max_new_tokens,
    api_key_env,
    out: Path,
    seed: int,
    pairs=None,
    *,
    judge_prompts=None,
    judge_constrain: bool = False,
):
    """``_judge_evaluator``'s, else the one the model's defaults supply (the organism's exact judge);
    ``missing``: the error when there is neither."""
    evaluator = _judge_evaluator(
        judge_url,
        judge_model,
        questions,
        samples,
        max_new_tokens,
        api_key_env,
        out,
        seed,
        pairs=pairs,
        judge_prompts=judge_prompts,
        judge_constrain=judge_constrain,
    ) or defaults().evaluator(model, samples, seed)
    if evaluator is None:
        raise SaediffError(missing)
    return evaluator


class ModelDefaults:
    """What a command may fill in for a model it knows, when the user gave nothing: the generic
    answer is always None (the bodies return nothing; the user must say). ``saediff.cli.app`` sets
    the organism's (``use_defaults``)."""

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

    def steering_cost(self, lm, model: str | None, budget: float):
        """The steering protocol's ``CostConfig`` for ``lm`` (loaded from ``model``), when the model
        has text of its own to price steering on (else ``steering_cost`` uses neutral answers)."""

    def prompt_set(self, spec: str, model: str) -> list:
        """A prompt set by name: a prompt file or ``first_plot`` (a known model may add its own)."""
        from saediff.data.prompts import load_prompts

        return load_prompts(spec)


_defaults = ModelDefaults()


def steering_cost(lm, model: str | None, budget: float, neutral: str | None = None):
    """What steering costs on ``lm``: KL on the user's ``neutral`` JSONL when given, else on the
    model's own text as its defaults supply it (the organism: its questions), else on its own greedy
    answers to the shipped benign questions."""
    from saediff.interventions.causal import chat_cost

    if neutral:
        return chat_cost(lm, budget, neutral)
    return defaults().steering_cost(lm, model, budget) or chat_cost(lm, budget)


def defaults() -> ModelDefaults:
    """What the generic commands fill in for models they know (the organism's, set by saediff.cli.app)."""
    return _defaults


def use_defaults(model_defaults: ModelDefaults) -> None:
    global _defaults
    _defaults = model_defaults
