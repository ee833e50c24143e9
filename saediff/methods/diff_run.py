"""Run folders for model diffing: ``run_diff`` -> ``run_compare`` (-> ``saediff.interventions.causal`` checks,
export).

A run folder holds ``run.json`` (config and artifacts of each step), ``responses.jsonl``,
``diff.json``, ``directions/`` (an export folder), ``cosines.json``, ``layers.json``,
``steering.json`` and plotly figures as standalone HTML. The answers and their labels come from
``answers``, the pass over both models from ``diff_stream``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from saediff._io import atomic_write_bytes, atomic_write_json
from saediff.activations.collect import row_descriptions, tokenize_prompts
from saediff.data.prompts import ContrastExample, Prompt, load_prompts
from saediff.data.runs import read_run, update_run
from saediff.errors import SaediffError
from saediff.methods.answers import judged_responses, label_counts, own_answers
from saediff.methods.diff_stream import stream_diff
from saediff.methods.directions import (
    Direction,
    cosine_table,
    lora_b_directions,
    sae_latent_direction,
    span_overlap,
)
from saediff.methods.export import export_directions, load_directions
from saediff.models.hooks import parse_layer, resid_post
from saediff.models.loading import ModelSpec, load_model
from saediff.models.provenance import sae_fingerprint

__all__ = ["diff_layers", "run_compare", "run_diff"]

log = logging.getLogger(__name__)


def _in_context(lm, ps: list, examples: list | None, hooks: list[str], n_shots: int, seed: int) -> list:
    """The in-context-induced directions when contrast examples were given."""
    from saediff.methods.directions import in_context_directions

    if not examples:
        return []
    return in_context_directions(lm, ps, examples, hooks, n_shots=n_shots, seed=seed, progress=True)


# long by its 19 documented options and the summary it records; the body is the diff's recipe in order
def run_diff(
    base: str,
    finetuned: str | None,
    sae_path: str,
    out: str | Path,
    *,
    adapter: str | None = None,
    prompts: str | list[Prompt] = "first_plot",
    max_new_tokens: int = 600,
    top_n: int = 10,
    ranking: str = "delta",
    icl_examples: str | list[ContrastExample] | None = None,
    n_shots: int = 3,
    seed: int = 0,
    judge=None,
    responses: str | None = None,
    labeller: Callable[[list[Prompt]], list[bool | None]] | None = None,
    extra_directions: list[Direction] = (),
    batch_size: int = 32,
    samples: int = 1,
    layers: str | Sequence[int] = "all",
    gen_batch_size: int = 64,
) -> dict:
    """Diff ``finetuned`` (or ``base`` + ``adapter`` when ``finetuned`` is None) against ``base``
    on the fine-tuned model's own answers; build every candidate direction. Returns the summary.

    ``prompts``: a prompt file, ``first_plot``, or Prompt objects. ``icl_examples``: contrast
    examples (a file for ``saediff.data.prompts.load_contrast_examples``, or the objects) for the
    in-context-induced direction on ``base``. The answers' labels for the response mean
    difference (True misaligned, False aligned, None left out; taken within each prompt domain, or
    each question of ``responses``, and averaged over them) come from ``judge`` (``(aligned,
    coherent)`` HTTP judges: misaligned when aligned < 30 and coherent > 50, aligned when aligned >
    70 and coherent > 50), or a ``labeller`` (e.g. an exact judge), or ``misaligned``/``aligned``
    prompt tags. ``responses``: a ``saediff eval`` responses.jsonl (scored answers) used instead of
    generating and judging. ``extra_directions`` (e.g. a known ground truth) join the export.

    ``samples``: answers per prompt, sampled by the fine-tuned model in one seeded pass; with more
    than one, a prompt without a domain is its own group (as ``responses`` groups by question).
    ``batch_size``: rows per streamed forward; ``gen_batch_size``: prompts per generation batch
    (seeded sampling depends on the batches, so the default keeps earlier answers). ``layers``: the
    blocks whose mean differences (and in-context directions) are built, ``"all"``, ``"sae"`` (the
    SAE's block only) or block indices; the SAE's block is always among them, and both models run
    only up to the deepest, with hooks on those blocks alone."""
    import time

    from saediff.data.prompts import load_contrast_examples

    t_start = time.perf_counter()
    if responses is not None and samples != 1:
        raise SaediffError(f"samples={samples} applies to generated answers; {responses} has its own")

    examples = load_contrast_examples(icl_examples) if isinstance(icl_examples, (str, Path)) else icl_examples
    prompt_set = (
        load_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
    )  # fail before loading
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm_base, lm_ft, sae, blocks = _load_pair(base, finetuned, adapter, sae_path, layers)
    sae_hook = sae.cfg.metadata.hook_name
    # the response mean difference is taken within groups (prompt domains, or the scored answers'
    # questions) and averaged over them
    if responses is not None:
        ps, labels, groups = judged_responses(responses)
        questions = ps
    else:
        questions = prompt_set
        ps, labels, groups = own_answers(
            lm_ft,
            prompt_set,
            max_new_tokens,
            seed,
            out,
            judge,
            labeller,
            samples=samples,
            batch_size=gen_batch_size,
        )
    # one tokenization for both models: the diff compares them on the very same tokens
    toks = tokenize_prompts(lm_ft, ps)
    stream = stream_diff(
        lm_base, lm_ft, toks, sae, labels, groups=groups, batch_size=batch_size, layers=blocks
    )
    diff = stream.acc.result()
    top = diff.top(top_n, ranking)
    _write_cards(out / "cards.json", sae_hook, stream.acc, [*top, *diff.bottom(3, "delta")], lm_ft, ps, toks)
    induced = "lora_downstream" if adapter is not None and finetuned is None else "mean_diff_models"
    directions = [
        *_sae_directions(sae, diff, top, ranking),
        *stream.mean_diffs(induced),
        *_in_context(lm_base, questions, examples, [resid_post(L) for L in blocks], n_shots, seed),
        *_lora_directions(adapter),
        *extra_directions,
    ]
    per = {f"sae_{i}": {"rank": r, "score": float(diff.score(ranking)[i])} for r, i in enumerate(top)}
    export_directions(
        directions,
        out / "directions",
        model=base,
        per_direction=per,
        extra={"finetuned": finetuned, "adapter": adapter, "sae": str(sae_path)},
    )
    summary = {
        "base": base,
        "finetuned": finetuned,
        "adapter": adapter,
        "sae": str(sae_path),
        "sae_hook": sae_hook,
        "sae_identity": sae_fingerprint(sae, sae_path),
        "prompts": prompts if isinstance(prompts, (str, Path)) else "given",
        "n_prompts": len(ps),
        "ranking": ranking,
        "top_latents": top,
        "labels": label_counts(labels),
        "responses": responses,
        "samples": samples if responses is None else None,
        "layers": blocks,
        "n_directions": len(directions),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    update_run(out, "diff", summary)
    # last: diff.json marks a finished diff (the demos skip a step whose file exists), so a run
    # killed before this line is redone whole by its rerun
    atomic_write_json(out / "diff.json", diff.to_json())
    return summary


def _write_cards(path: Path, hook: str, acc, latents: list[int], lm_ft, ps: list, toks) -> None:
    """The cards of ``latents`` (``acc``: the stream's ``DiffAccumulator``; their top activations
    described by the response tokens of ``ps`` as ``toks`` holds them) to ``path``."""
    describe = lambda which: row_descriptions(lm_ft, ps, toks, "response", which)
    cards = [acc.card(i, describe).to_json() for i in latents]
    atomic_write_json(path, {"kind": "saediff.latent_cards", "hook_name": hook, "cards": cards})


def _load_pair(base: str, finetuned: str | None, adapter: str | None, sae_path: str, layers) -> tuple:
    """The base model, the fine-tuned one (``base`` + ``adapter``, merged, when ``finetuned`` is
    None), the SAE (checked against the base model) and the blocks the diff reads (``diff_layers``)."""
    from saediff.saes.loading import check_sae_fits, load_sae

    lm_base = load_model(base)
    lm_ft = load_model(ModelSpec(finetuned or base, adapter=adapter, merge=adapter is not None))
    sae = load_sae(sae_path)
    check_sae_fits(sae, lm_base.model, str(sae_path))
    blocks = diff_layers(
        layers, parse_layer(sae.cfg.metadata.hook_name), lm_base.model.config.num_hidden_layers
    )
    return lm_base, lm_ft, sae, blocks


def _sae_directions(sae, diff, top: list[int], ranking: str) -> list[Direction]:
    """The decoder rows of the ``top`` latents, each with its rank and delta."""
    return [
        sae_latent_direction(sae, i, f"sae_{i}", rank=rank, ranking=ranking, delta=float(diff.delta[i]))
        for rank, i in enumerate(top)
    ]


def _lora_directions(adapter: str | None) -> list[Direction]:
    """The adapter's B directions (none without an adapter)."""
    if adapter is None:
        return []
    from saediff.models.lora import read_adapter

    return lora_b_directions(read_adapter(adapter))


def diff_layers(layers: str | Sequence[int], sae_layer: int, n_layers: int) -> list[int]:
    """The blocks a diff reads: ``"all"``, ``"sae"`` (the SAE's block) or indices, with the SAE's
    block always among them; sorted. An index outside the model is one line naming it."""
    if isinstance(layers, str):
        if layers not in ("all", "sae"):
            raise SaediffError(f"layers must be 'all', 'sae' or block indices, got {layers!r}")
        return list(range(n_layers)) if layers == "all" else [sae_layer]
    bad = [L for L in layers if not 0 <= int(L) < n_layers]
    if bad:
        raise SaediffError(f"layers {bad} outside the model's blocks 0..{n_layers - 1}")
    return sorted({int(L) for L in layers} | {sae_layer})


def run_compare(run_dir: str | Path, downstream: bool = True) -> dict:
    """Cosine table at the SAE's hook, per-layer curves, and the adapter's downstream effect. Of a
    rank-r adapter module's r directions the table and the curves take the top one (singular index
    0); the span of all r against the other dense candidates there (the adapter's downstream
    effect among them) is ``lora_spans`` in ``cosines.json``."""
    run_dir = Path(run_dir)
    info = read_run(run_dir)["steps"]["diff"]
    dirs = load_directions(run_dir / "directions")
    hook = info["sae_hook"]
    cosines = _cosines(run_dir, dirs, hook)
    layers = sorted({parse_layer(d.hook) for d in dirs.values()})
    result = {
        "kind": "saediff.layer_curves",
        "layers": layers,
        "curves": _layer_curves(dirs, layers, downstream),
    }
    _write_layers(run_dir, result)
    summary = {"hook": hook, "cosines": cosines, "layers": result}
    update_run(
        run_dir,
        "compare",
        {"hook": hook, "files": ["cosines.json", "cosines.html", "layers.json", "layers.html"]},
    )
    return summary


def _top_sv(d: Direction) -> bool:
    """Whether ``d`` is its adapter module's top direction (singular index 0), or not an adapter's."""
    return d.provenance.get("singular_index", 0) == 0


def _cosines(run_dir: Path, dirs: dict[str, Direction], hook: str) -> dict:
    """The cosine table of the directions at ``hook`` (each adapter module's top direction), the
    span of the top latents against the dense candidates and each adapter module's span against
    the others; written to ``cosines.json`` and ``cosines.html``."""
    at_hook = [d for d in dirs.values() if d.hook == hook and d.method != "lora_downstream" and _top_sv(d)]
    table = cosine_table(at_hook)
    latents = [d for d in at_hook if d.method == "sae_latent"]
    dense = [d for d in at_hook if d.method not in ("sae_latent", "random")]
    overlap = {"span_of_top_latents": span_overlap(latents, dense)} if latents and dense else {}
    spans: dict[str, list[Direction]] = {}
    for d in dirs.values():
        if d.hook == hook and d.method == "lora_b" and "singular_index" in d.provenance:
            spans.setdefault(d.provenance["module"], []).append(d)
    others = [
        d for d in dirs.values() if d.hook == hook and d.method not in ("sae_latent", "random", "lora_b")
    ]
    if spans and others:
        overlap["lora_spans"] = {module: span_overlap(ds, others) for module, ds in spans.items()}
    atomic_write_json(run_dir / "cosines.json", {**table.to_json(), **overlap})
    atomic_write_bytes(run_dir / "cosines.html", table.figure().to_html(include_plotlyjs="cdn").encode())
    return {**table.to_json(), **overlap}


def _layer_curves(dirs: dict[str, Direction], layers: list[int], downstream: bool) -> dict[str, list]:
    """Per pair of direction kinds, their cosine at each block of ``layers`` (None where one is
    missing); with ``downstream``, the adapter's too, and each B vector held fixed against the
    directions at its block and after."""
    by = lambda m, L: dirs.get(f"{m}_L{L}")
    curves: dict[str, list] = {}
    pairs = [
        ("mean_diff_models", "ground_truth"),
        ("mean_diff_responses", "ground_truth"),
        ("mean_diff_models", "mean_diff_responses"),
        ("in_context", "mean_diff_models"),
        ("in_context", "ground_truth"),
    ]
    if downstream:
        pairs += [
            ("lora_downstream", "ground_truth"),
            ("lora_downstream", "mean_diff_responses"),
            ("lora_b", "ground_truth"),
            ("lora_b", "mean_diff_responses"),
        ]
    for a, b in pairs:
        vals = []
        for L in layers:
            da, db = by(a, L), by(b, L)
            vals.append(
                None if da is None or db is None else float(torch.cosine_similarity(da.vector, db.vector, 0))
            )
        if any(v is not None for v in vals):
            curves[f"{a} vs {b}"] = vals
    # the B vector of a layer-L adapter against the directions at every later layer
    for name, d in dirs.items():
        if d.method == "lora_b" and downstream and _top_sv(d):
            L0 = parse_layer(d.hook)
            for ref in ("ground_truth", "mean_diff_responses"):
                vals = [
                    float(torch.cosine_similarity(d.vector, by(ref, L).vector, 0))
                    if L >= L0 and by(ref, L) is not None
                    else None
                    for L in layers
                ]
                if any(v is not None for v in vals):
                    curves[f"{name} (fixed) vs {ref}"] = vals
    return curves


def _write_layers(run_dir: Path, result: dict) -> None:
    """The layer curves to ``layers.json`` and as a plotly figure to ``layers.html``."""
    import plotly.graph_objects as go

    atomic_write_json(run_dir / "layers.json", result)
    layers, curves = result["layers"], result["curves"]
    fig = go.Figure([go.Scatter(x=layers, y=v, mode="lines+markers", name=k) for k, v in curves.items()])
    fig.update_layout(
        title="cosine per layer (blocks.L.hook_resid_post)",
        xaxis_title="layer",
        yaxis_title="cosine",
        yaxis_range=[-1, 1],
    )
    atomic_write_bytes(run_dir / "layers.html", fig.to_html(include_plotlyjs="cdn").encode())
