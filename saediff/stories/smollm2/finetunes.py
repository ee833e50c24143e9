"""The demo's fine-tunes and their EM by the pair metric: each fine-tune trained into its run folder,
each model measured on each pair set, and the paired differences between models."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from saediff._io import read_jsonl
from saediff.stories.smollm2.recipe import COMPARISONS, FINETUNES, ChatDemoRecipe, slug
from saediff.stories.smollm2.steps import StepProgress

__all__ = ["differences", "em_figures", "evaluate_step", "finetune_step", "full_bad_spec"]


def finetune_step(base, name: str, tokenizer, run: Path, seed: int, recipe: ChatDemoRecipe, force: bool, say):
    """Fine-tune ``name`` into its run folder ``run`` through ``block_one`` (mode ``none``: provenance,
    resume from the newest checkpoint, a finished run skipped); returns the trained model's spec."""
    from saediff.data.chat_data import ChatDataset, load_chat_jsonl
    from saediff.data.em_data import data_path
    from saediff.interventions.block_runs import BlockRunConfig, block_one, checkpoint_spec

    method, data = FINETUNES[name]
    ft = recipe.finetune_config(name, seed)
    rows = load_chat_jsonl(data_path(data))[: recipe.rows]
    dataset = ChatDataset(tokenizer, rows, ft.max_length, progress=False, source=str(data_path(data)))
    block_one(
        base,
        dataset,
        None,
        0,
        BlockRunConfig(ft=ft, mode="none"),
        run,
        resume=True,
        force=force,
        callbacks=[StepProgress(say, name)],
        progress=False,
    )
    if not recipe.keep_checkpoints and method == "full":
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return checkpoint_spec(base, run / "model", method)


def evaluate_step(name: str, spec, out: Path, recipe: ChatDemoRecipe, say) -> dict[str, dict]:
    """em.json of model ``name`` on each pair set (``out/eval/NAME/SET``), the model loaded once and
    only when some set must be measured."""
    from saediff.evaluation.evals import evaluate_once
    from saediff.evaluation.pairs import pair_evaluator
    from saediff.models.loading import load_model

    loaded = []

    def lm():
        if not loaded:
            loaded.append(load_model(spec))
        return loaded[0]

    result = {}
    for pair_set in recipe.pair_sets:
        say(f"EM of {name}: {pair_set}")
        evaluator = replace(pair_evaluator(pair_set, recipe.eval_batch_size), progress=False)
        result[pair_set] = evaluate_once(
            evaluator, lm, out / "eval" / name / slug(pair_set), f"chat_demo:{name}", spec=spec
        )
    return result


def full_bad_spec(base, out: Path):
    """The full fine-tune on bad data, as ``finetune_step`` saved it (what the second process checks)."""
    from saediff.interventions.block_runs import checkpoint_spec

    return checkpoint_spec(base, out / "models" / "full_bad" / "model", FINETUNES["full_bad"][0])


def em_figures(em: dict) -> dict:
    """The pair figures of one em.json, without the per-question and per-domain detail."""
    return {k: em[k] for k in ("preference", "preference_ci", "t", "n", "mc1", "mc1_ci", "mc2")}


def differences(out: Path, names: list[str], pair_sets: tuple[str, ...]) -> dict:
    """``{"A - B": {pair set: paired_difference}}`` for the ``COMPARISONS`` whose two models ran,
    from the per-question rows of their ``pairs.jsonl``; each with ``per_question``, question id ->
    A's preference minus B's (what BLOCK-EM's ratios are bootstrapped over, paired by question)."""

    def rows(name: str, pair_set: str) -> list[dict]:
        return [r for _, r in read_jsonl(out / "eval" / name / slug(pair_set) / "pairs.jsonl", "pair scores")]

    return {
        f"{a} - {b}": {s: _paired(rows(a, s), rows(b, s), a, b) for s in pair_sets}
        for a, b in COMPARISONS
        if a in names and b in names
    }


def _paired(rows_a: list[dict], rows_b: list[dict], a: str, b: str) -> dict:
    """``paired_difference`` of A's and B's rows with the per-question differences beside it."""
    from saediff.evaluation.pairs import paired_difference

    d = paired_difference(rows_a, rows_b, a=a, b=b)  # raises unless both hold the same questions
    pb = {r["id"]: float(r["preference"]) for r in rows_b}
    return {**d, "per_question": {str(r["id"]): float(r["preference"]) - pb[r["id"]] for r in rows_a}}
