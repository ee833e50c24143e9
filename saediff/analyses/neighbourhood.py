"""The activation-neighbourhood toxicity probe: the superposition account of EM says a fine-tune
that sharpens a feature of its own data strengthens the features that share its dimensions. This
probe looks for those neighbours.

1. *Seeds*: the SAE latents the fine-tune raised most on its own training conversations
   (fine-tuned minus base mean activation over the assistant tokens of ``n_train`` rows).
2. *Neighbours* of each seed: the latents whose decoder rows are closest to its row (cosine), and
   the latents that co-activate with it most on the base model (Pearson r over tokens).
3. For each neighbour: did it also rise *off-domain* (on the diff run's questions outside the
   training domain, with the fine-tune's answers), i.e. is its delta in the top 5% of all
   latents'; and its *toxicity*: the largest cosine of its decoder row with the run's persona
   candidates (by default the in-context direction and the response mean difference, which need
   no behavioural measurement of this fine-tune beyond labelling its answers), counted only above
   the 99th percentile of the same cosine over all latents and the random-direction p95.
4. *Flagged*: neighbours that rose off-domain and are toxic, ranked by toxicity. The random
   baseline runs steps 2-4 from as many random seeds (latents active on the training data): a
   fine-tune that flags no more than that has flagged nothing.

The training-data screen then ranks the fine-tune's rows by how strongly the base model's flagged
latents fire on their assistant tokens and writes the file without the top ``drop_fraction``
(and, for the comparison, without as many random rows).

    saediff neighbourhood RUN --train-data data/bad_medical_advice.jsonl --drop-fraction 0.1
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from saediff import console
from saediff.analyses.neighbourhood_probe import coactivation, encoded, latent_means, probe, random_seeds
from saediff.errors import SaediffError
from saediff.models.hooks import capture_resid, parse_layer

__all__ = [
    "neighbourhood_figure",
    "run_neighbourhood",
    "screen_finetunes",
    "screen_rows",
    "steer_flagged",
]


def _candidates(run_dir: Path, hook: str, source: str | Path | None, methods: tuple[str, ...]) -> dict:
    from saediff.methods.export import load_directions

    dirs = load_directions(source or run_dir / "directions")
    out = {n: d.vector for n, d in dirs.items() if d.hook == hook and d.method in methods}
    if not out:
        raise SaediffError(
            f"{source or run_dir / 'directions'}: no persona candidate ({', '.join(methods)}) at {hook}; "
            "give --candidates (an export folder) or --icl-examples to saediff diff"
        )
    return out


# long: its signature and docstring; the code itself is 43 lines
def run_neighbourhood(
    run_dir: str | Path,
    train_data: str | Path,
    *,
    in_domain: str | None = None,
    n_train: int = 256,
    n_seeds: int = 10,
    n_neighbours: int = 5,
    n_random: int = 5,
    candidates: str | Path | None = None,
    candidate_methods: tuple[str, ...] = ("in_context", "mean_diff_responses"),
    drop_fraction: float | None = None,
    evaluator=None,
    cost=None,
    null=None,
    steer_top: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """``saediff neighbourhood RUN``: the probe for a diff run's fine-tune, with its training data
    (``train_data``) as the in-domain text and the run's questions outside ``in_domain`` (all of them
    when None) as the off-domain text. With ``drop_fraction`` the screen writes
    ``screened.jsonl`` and ``random_dropped.jsonl`` beside ``neighbourhood.json`` in the run folder.
    With an ``evaluator`` the ``steer_top`` most toxic flagged latents also get the steering check
    (``steer_flagged``): does steering the base model along them induce EM, beyond the null at the
    same cost? ``cost`` prices it: a ``CostConfig``, or a function of the loaded base model that
    builds one (the CLI's ``steering_cost``, the organism's ``organism_cost``; the base model is
    loaded here); default: ``causal.chat_cost`` of the base model; ``null``: its ``NullConfig``."""
    from saediff.data.chat_data import load_chat_jsonl, write_chat_jsonl
    from saediff.data.runs import read_run
    from saediff.models.loading import ModelSpec, load_model
    from saediff.saes.loading import load_sae

    run_dir = Path(run_dir)
    info = read_run(run_dir)["steps"]["diff"]
    if drop_fraction is not None and not 0 < drop_fraction < 1:
        raise SaediffError(f"--drop-fraction must lie in (0, 1), got {drop_fraction}")
    sae = load_sae(info["sae"])
    hook = sae.cfg.metadata.hook_name
    cands = _candidates(run_dir, hook, candidates, candidate_methods)
    rows = load_chat_jsonl(train_data)
    train, off = _texts(run_dir, rows, in_domain, n_train, seed)
    base = load_model(info["base"])
    ft = load_model(
        ModelSpec(
            info["finetuned"] or info["base"], adapter=info["adapter"], merge=info["adapter"] is not None
        )
    )
    res, seeds, resid_norm = _probe(
        base, ft, sae, train, off, cands, n_seeds, n_random, n_neighbours, seed, progress
    )
    out = {
        "kind": "saediff.neighbourhood",
        "hook": hook,
        "train_data": str(train_data),
        "n_train": len(train),
        "n_off_domain": len(off),
        "in_domain": in_domain,
        "candidates": sorted(cands),
        **res.to_json(),
        "above_random": len(res.flagged) > (res.random_baseline["mean"] or 0),
        "resid_norm": resid_norm,
    }
    if evaluator is not None and res.flagged:
        steer_cost = cost(base) if callable(cost) else cost
        _steer_members(
            out,
            steer_flagged(run_dir, res.flagged[:steer_top], base, sae, evaluator, cost=steer_cost, null=null),
        )
    if drop_fraction is not None:
        out["screen"] = _screen(
            base, sae, rows, res.flagged or seeds, drop_fraction, run_dir, seed, progress, write_chat_jsonl
        )
    _write(run_dir, out, train_data, in_domain)
    return out


def _steer_members(out: dict, steer: dict) -> None:
    """The steering check (``steer_flagged``'s result) into ``out``, and each steered member's EM,
    effect over the unsteered model, p-value against the null and verdict."""
    out["steer"] = steer
    for m in out["members"]:
        steered = steer["latents"].get(str(m["latent"]))
        if steered is not None and steered["scale_found"]:  # else no scale reached a cost level
            m["steer_em_rate"] = steered["em_rate"]
            m.update({f"steer_{k}": steered[k] for k in ("effect", "effect_ci", "p_value", "verdict")})


def _write(run_dir: Path, out: dict, train_data: str | Path, in_domain: str | None) -> None:
    """``neighbourhood.json``, its figure ``neighbourhood.html`` and the run's record of the step."""
    from saediff._io import atomic_write_bytes, atomic_write_json
    from saediff.data.runs import update_run

    atomic_write_json(run_dir / "neighbourhood.json", out)
    atomic_write_bytes(
        run_dir / "neighbourhood.html", neighbourhood_figure(out).to_html(include_plotlyjs="cdn").encode()
    )
    update_run(
        run_dir,
        "neighbourhood",
        {
            "train_data": str(train_data),
            "in_domain": in_domain,
            "files": ["neighbourhood.json", "neighbourhood.html"],
        },
    )


def _texts(run_dir: Path, rows: list, in_domain: str | None, n_train: int, seed: int) -> tuple[list, list]:
    """The probe's in-domain text (``n_train`` training conversations drawn with ``seed``) and its
    off-domain text (the run's answered questions outside ``in_domain``)."""
    from saediff.data.prompts import Prompt
    from saediff.data.runs import run_questions

    pick = sorted(random.Random(seed).sample(range(len(rows)), min(n_train, len(rows))))
    train = [Prompt(f"train{i}", rows[i][:-1], rows[i][-1]["content"]) for i in pick]
    off = [
        p
        for p in run_questions(run_dir).first_answers
        if p.response and (in_domain is None or p.domain != in_domain)
    ]
    if not off:
        raise SaediffError(f"{run_dir}: no answered questions outside domain {in_domain!r}")
    return train, off


def _probe(
    base,
    ft,
    sae,
    train: list,
    off: list,
    cands: dict[str, torch.Tensor],
    n_seeds: int,
    n_random: int,
    n_neighbours: int,
    seed: int,
    progress: bool,
):
    """The probe on ``train`` (in-domain) and ``off`` (off-domain): its result, its seeds (the
    ``n_seeds`` latents that rose most on the training text) and the base model's mean residual
    norm at the SAE's hook off-domain."""
    from saediff.activations.collect import tokenize_prompts

    toks_in, toks_off = tokenize_prompts(base, train), tokenize_prompts(base, off)
    means_in = latent_means(base, ft, toks_in, sae, progress=progress)
    means_off = latent_means(base, ft, toks_off, sae, progress=progress)
    seeds = [int(i) for i in torch.argsort(means_in.delta, descending=True, stable=True)[:n_seeds]]
    draws = random_seeds(means_in, n_seeds, n_random, seeds, seed)
    corr_seeds = list(dict.fromkeys([*seeds, *(i for d in draws for i in d)]))
    corr = coactivation(base, [toks_in, toks_off], sae, corr_seeds, progress=progress)
    W_dec = sae.W_dec.detach().float().cpu()
    res = probe(
        W_dec,
        means_in,
        means_off,
        corr,
        corr_seeds,
        {k: v.cpu() for k, v in cands.items()},
        seeds=seeds,
        random_draws=draws,
        n_neighbours=n_neighbours,
    )
    return res, seeds, means_off.resid_norm


def _screen(
    lm,
    sae,
    rows: list,
    latents: list[int],
    drop_fraction: float,
    run_dir: Path,
    seed: int,
    progress: bool,
    write,
) -> dict:
    """Score every training row, write the file without the top ``drop_fraction`` and one without
    as many random rows."""
    from saediff.activations.collect import tokenize_prompts
    from saediff.data.prompts import Prompt

    toks = tokenize_prompts(lm, [Prompt(f"row{i}", r[:-1], r[-1]["content"]) for i, r in enumerate(rows)])
    scores = screen_rows(lm, toks, sae, latents, progress=progress)
    n_drop = max(1, round(drop_fraction * len(rows)))
    order = sorted(range(len(rows)), key=lambda i: -scores[i])
    dropped = set(order[:n_drop])
    rand = set(random.Random(seed + 1).sample(range(len(rows)), n_drop))
    write(run_dir / "screened.jsonl", [r for i, r in enumerate(rows) if i not in dropped])
    write(run_dir / "random_dropped.jsonl", [r for i, r in enumerate(rows) if i not in rand])
    return {
        "latents": latents,
        "drop_fraction": drop_fraction,
        "n_rows": len(rows),
        "n_dropped": n_drop,
        "screened": str(run_dir / "screened.jsonl"),
        "random_dropped": str(run_dir / "random_dropped.jsonl"),
        "score_dropped_mean": sum(scores[i] for i in dropped) / n_drop,
        "score_kept_mean": sum(scores[i] for i in range(len(rows)) if i not in dropped)
        / max(1, len(rows) - n_drop),
    }


@torch.no_grad()
def screen_rows(
    lm, toks, sae, latents: list[int], *, batch_size: int = 32, progress: bool = True
) -> list[float]:
    """Per row of ``toks``: the mean over its response tokens of the summed activation of ``latents``
    on ``lm`` (the training-data screen's score)."""
    L = parse_layer(sae.cfg.metadata.hook_name)
    idx = torch.tensor(latents)
    keep = toks.select("response")
    scores = []
    for i in console.progress(range(0, toks.input_ids.shape[0], batch_size), desc="screen", enabled=progress):
        ids, attn, m = toks.batch(slice(i, i + batch_size), keep)
        x = capture_resid(lm.model, [L], ids.to(lm.device), attn.to(lm.device))[L]  # (B, T, D)
        flat = x.reshape(-1, x.shape[-1])
        a = torch.cat([z[:, idx].sum(-1).cpu() for z in encoded(sae, flat)]).view(m.shape) * m  # (B, T)
        scores += (a.sum(1) / m.sum(1).clamp_min(1)).tolist()
    return scores


def steer_flagged(
    run_dir: str | Path,
    latents: list[int],
    lm,
    sae,
    evaluator,
    *,
    cost=None,
    null=None,
) -> dict:
    """The steering check of flagged latents, by saediff's steering protocol
    (``steer_protocol.select_and_report``): the base model ``lm`` steered along each latent's unit
    decoder row at the SAE's block, at the scales where it costs the levels of ``cost`` (a
    ``CostConfig``: KL per neutral token; default ``causal.chat_cost`` of ``lm``); the level is
    chosen on half of the evaluator's questions and the effect (the paired change of each
    question's EM score, with its 95% interval) reported on the other half against ``null``
    (default ``NullConfig()``: 20 directions at the same cost), with its empirical p-value and
    verdict. Scales are in units of the mean residual norm there (``resid_norm``). A latent no scale
    reaches a cost level for has ``scale_found`` False, ``em_rate`` None and a note. Each condition
    is kept under ``RUN/neighbourhood_steer/`` (a rerun reuses it)."""
    from saediff.interventions.causal import chat_cost, residual_stats
    from saediff.interventions.steer_null import NullConfig
    from saediff.interventions.steer_protocol import Arm, induce_summary, select_and_report

    run_dir = Path(run_dir)
    L = parse_layer(sae.cfg.metadata.hook_name)
    norms, _ = residual_stats(lm, run_dir, {})
    cost = cost or chat_cost(lm)
    select, report = evaluator.halves()
    sel = select_and_report(
        {str(i): sae.W_dec[i].detach().float().cpu() for i in latents},
        [Arm("induce", lm)],
        L,
        norms[L],
        select,
        report,
        run_dir / "neighbourhood_steer",
        cost,
        null=null or NullConfig(),
    )
    return {
        "base_em_rate": sel.unsteered["induce"]["report"]["em_rate"],
        "resid_norm": norms[L],
        "neutral": cost.neutral.source,
        "costs": sel.costs,
        "null_config": sel.null_config,
        "latents": {i: induce_summary(c) for i, c in sel.candidates.items()},
    }


def screen_finetunes(
    model, screen: dict, sae, ft, evaluator, out: str | Path, *, progress: bool = True
) -> dict:
    """The screen's test: the same fine-tune (``ft``, a ``FinetuneConfig``) on the screened rows and
    on the rows left after dropping as many at random, each evaluated (``out/screened``,
    ``out/random_dropped``; a finished run is skipped). Returns each run's EM and the relative
    change of the screened run against the random one."""
    from saediff.interventions.block_runs import finetune_plain
    from saediff.models.loading import ModelSpec, load_model

    spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
    tokenizer = load_model(spec).tokenizer
    res = {}
    for name in ("screened", "random_dropped"):
        em = finetune_plain(
            spec,
            screen[name],
            sae,
            ft,
            Path(out) / name,
            evaluator=evaluator,
            tokenizer=tokenizer,
            progress=progress,
        ).get("em", {})
        res[name] = {"em_rate": em.get("em_rate"), "em_rate_ci": em.get("em_rate_ci")}
    a, b = res["screened"]["em_rate"], res["random_dropped"]["em_rate"]
    res["relative_change"] = (a / b - 1) if a is not None and b else None
    res["steps"] = ft.steps
    return res


def neighbourhood_figure(result: dict):
    """Seeds on an inner ring, their neighbours outside, an edge per neighbour relation; colour is
    toxicity, flagged neighbours are drawn large with a red outline."""
    import plotly.graph_objects as go

    seeds, members = result["seeds"], result["members"]
    pos, outer = _ring_positions(seeds, members)
    ex, ey = [], []
    for m in members:
        for s in m["seeds"]:
            ex += [pos[s][0], pos[m["latent"]][0], None]
            ey += [pos[s][1], pos[m["latent"]][1], None]
    fig = go.Figure(
        [
            go.Scatter(
                x=ex,
                y=ey,
                mode="lines",
                line={"width": 0.5, "color": "#bbb"},
                hoverinfo="skip",
                showlegend=False,
            )
        ]
    )
    fig.add_scatter(
        x=[pos[s][0] for s in seeds],
        y=[pos[s][1] for s in seeds],
        mode="markers+text",
        text=[str(s) for s in seeds],
        textposition="top center",
        name="seeds (rose on the training data)",
        marker={"size": 12, "symbol": "diamond", "color": "#555"},
    )
    _add_neighbours(fig, pos, outer)
    rb = result["random_baseline"]
    fig.update_layout(
        title=f"neighbourhood probe at {result['hook']}: {result['n_flagged']} flagged "
        f"(random seeds: mean {rb['mean']})",
        xaxis={"visible": False},
        yaxis={"visible": False, "scaleanchor": "x"},
    )
    return fig


def _ring_positions(
    seeds: list[int], members: list[dict]
) -> tuple[dict[int, tuple[float, float]], list[dict]]:
    """(x, y) of each latent: the seeds on the unit circle, the other members (returned, in order)
    on a circle of radius 2.2."""
    pos = {
        s: (math.cos(2 * math.pi * i / len(seeds)), math.sin(2 * math.pi * i / len(seeds)))
        for i, s in enumerate(seeds)
    }
    outer = [m for m in members if m["latent"] not in pos]
    for i, m in enumerate(outer):
        a = 2 * math.pi * i / max(1, len(outer))
        pos[m["latent"]] = (2.2 * math.cos(a), 2.2 * math.sin(a))
    return pos, outer


def _add_neighbours(fig, pos: dict[int, tuple[float, float]], outer: list[dict]) -> None:
    """The neighbours as markers coloured by toxicity, the flagged ones large, outlined and labelled."""
    fig.add_scatter(
        x=[pos[m["latent"]][0] for m in outer],
        y=[pos[m["latent"]][1] for m in outer],
        mode="markers+text",
        text=[str(m["latent"]) if m["flagged"] else "" for m in outer],
        hovertext=[
            f"latent {m['latent']}: toxicity {m['toxicity']:.2f} ({m['candidate']}), off-domain "
            f"delta {m['delta_off']:.3f}"
            for m in outer
        ],
        name="neighbours",
        marker={
            "size": [16 if m["flagged"] else 8 for m in outer],
            "color": [m["toxicity"] for m in outer],
            "colorscale": "RdBu_r",
            "cmin": -1,
            "cmax": 1,
            "colorbar": {"title": "toxicity"},
            "line": {"width": [3 if m["flagged"] else 0 for m in outer], "color": "red"},
        },
    )
