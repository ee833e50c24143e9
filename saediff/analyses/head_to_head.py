"""The head-to-head: every direction-finding method saediff has, on one fine-tune pair, in one table.

Per method: its direction at the SAE's block, its cosine with the ground truth (where one is
known: the organism), its steering effect on held-out questions beside random directions of equal
norm (``causal.select_and_report``: the scale chosen on one half of the evaluator's questions,
every figure from the other half), its agreement with the other methods (cosines) and its cost in
seconds. The methods:

- from a diff run (``saediff diff``, one pass; its seconds are shared): ``sae_diff`` (the SAE
  latent that rose most), ``mean_diff_models`` (or ``lora_downstream`` for an adapter),
  ``mean_diff_responses``, ``in_context``, ``lora_b`` (where the adapter writes at that block);
- computed here: ``crosscoder`` (the most clearly new fine-tune-only latent by latent scaling),
  ``diff_sae`` (the diff-SAE latent carrying the largest share of the mean difference), ``adl``
  (the mean shift on the first answer tokens), ``persona`` (Chen et al.'s persona vector with
  reference answers: mean response residual of misaligned minus aligned answers, base model).

    saediff head-to-head --diff-run RUN --prompts data.jsonl --contrast pairs.jsonl --pairs offdomain --out H2H
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saediff import _io
from saediff.errors import SaediffError

__all__ = ["DIFF_METHODS", "OWN_METHODS", "HeadToHeadConfig", "persona_vector", "run_head_to_head"]

log = logging.getLogger(__name__)
DIFF_METHODS = ("sae_diff", "mean_diff_models", "mean_diff_responses", "in_context", "lora_b")
OWN_METHODS = ("crosscoder", "diff_sae", "adl", "persona")


@dataclass(frozen=True)
class HeadToHeadConfig:
    methods: tuple[str, ...] = DIFF_METHODS + OWN_METHODS
    crosscoder_latents: int | None = None
    """None: twice the diff run's SAE's width (a latent per model's feature)"""
    crosscoder_k: int | None = None
    """None: the diff run's SAE's k (the sparsity the run already chose for this block)"""
    crosscoder_steps: int = 2000
    diff_sae_latents: int | None = None
    """None: the diff run's SAE's width"""
    diff_sae_k: int | None = None
    """None: the diff run's SAE's k"""
    diff_sae_steps: int = 2000
    batch_size: int = 512
    lr: float = 3e-3
    adl_k: int = 5
    positions: str = "response"
    """tokens of ``prompts`` the crosscoder and the diff-SAE train on"""
    scales: tuple[float, ...] = (0.5, 1.0)
    """steering scales, x the base model's mean residual norm at the block"""
    n_random: int = 3
    coherence_budget: float = 0.10
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in DIFF_METHODS + OWN_METHODS]
        if unknown:
            raise SaediffError(
                f"unknown method {unknown[0]!r}; choose from {', '.join(DIFF_METHODS + OWN_METHODS)}"
            )


@torch.no_grad()
def persona_vector(lm, examples: list, layer: int, batch_size: int = 16) -> torch.Tensor:
    """Mean over ``examples`` (objects with question / misaligned / aligned) of the base model's
    mean residual over the misaligned answer's tokens minus the aligned answer's, after ``layer``."""
    from saediff.activations.collect import prompt_activations
    from saediff.data.prompts import Prompt

    msgs = lambda e: [{"role": "user", "content": e.question}]
    mis = [Prompt(f"m{i}", msgs(e), e.misaligned) for i, e in enumerate(examples)]
    ali = [Prompt(f"a{i}", msgs(e), e.aligned) for i, e in enumerate(examples)]
    a = prompt_activations(lm, mis, [layer], "response", batch_size=batch_size, progress=False)[layer]
    b = prompt_activations(lm, ali, [layer], "response", batch_size=batch_size, progress=False)[layer]
    return (a - b).mean(0)


def _from_diff_run(run_dir: Path, info: dict, L: int) -> dict[str, torch.Tensor]:
    """The diff run's candidates at block L, by method."""
    from saediff.methods.export import load_directions

    found = load_directions(run_dir / "directions")
    out = {}
    if info["top_latents"] and f"sae_{info['top_latents'][0]}" in found:
        out["sae_diff"] = found[f"sae_{info['top_latents'][0]}"].vector
    for method, names in (
        ("mean_diff_models", (f"mean_diff_models_L{L}", f"lora_downstream_L{L}")),
        ("mean_diff_responses", (f"mean_diff_responses_L{L}",)),
        ("in_context", (f"in_context_L{L}",)),
    ):
        hit = next((found[n].vector for n in names if n in found), None)
        if hit is not None:
            out[method] = hit
    lora = [d for d in found.values() if d.method == "lora_b" and d.hook == f"blocks.{L}.hook_resid_post"]
    if lora:
        out["lora_b"] = lora[0].vector
    gt = found.get(f"ground_truth_L{L}")
    return out | ({"_ground_truth": gt.vector} if gt is not None else {})


def _paired_rows(lm_base, lm_ft, prompts: list, hook: str, positions: str, seed: int) -> torch.Tensor:
    from saediff.activations.collect import tokenize_prompts
    from saediff.activations.streams import paired_rows

    rows = torch.cat(
        list(paired_rows(lm_base, lm_ft, tokenize_prompts(lm_base, prompts), hook, positions=positions))
    )
    return rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))]


def _own_methods(
    lm_base, lm_ft, cfg: HeadToHeadConfig, L: int, prompts: list, contrast: list, notes: dict, sae_cfg
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The methods computed here, each timed (the paired read is charged to the two that need it);
    widths and k not given follow the diff run's SAE (``sae_cfg``: d_sae, k)."""
    from saediff.methods.adl import ADLConfig, adl_differences, position_mean
    from saediff.models.hooks import resid_post

    vecs, cost = {}, {}
    hook = resid_post(L)
    wants = [m for m in cfg.methods if m in OWN_METHODS]
    read_s = 0.0
    if {"crosscoder", "diff_sae"} & set(wants):
        t = time.perf_counter()
        rows = _paired_rows(lm_base, lm_ft, prompts, hook, cfg.positions, cfg.seed)
        read_s = time.perf_counter() - t
        n_sharing = len({"crosscoder", "diff_sae"} & set(wants))
    if "crosscoder" in wants:
        from saediff.methods.crosscoder import crosscoder_stats, ft_direction, ft_only_ranking, latent_rows
        from saediff.saes.crosscoder import CrosscoderConfig, class_counts, train_crosscoder

        t = time.perf_counter()
        ccfg = CrosscoderConfig(
            d_sae=cfg.crosscoder_latents or 2 * sae_cfg["d_sae"],
            k=cfg.crosscoder_k or sae_cfg["k"],
            steps=cfg.crosscoder_steps,
            batch_size=min(cfg.batch_size, rows.shape[0] // 2),
            lr=cfg.lr,
            seed=cfg.seed,
            device="cpu",
        )
        cc, hist = train_crosscoder(rows, ccfg, hook_name=hook, progress=False)
        st = crosscoder_stats(cc, [rows])
        lat_rows = latent_rows(cc, st)
        ranked = ft_only_ranking(lat_rows, 1)
        classes = class_counts([r["class"] for r in lat_rows])
        notes["crosscoder"] = {"classes": classes, "fvu": hist["fvu"][-1]}
        if not ranked:  # said in the row, not hidden: the crosscoder's most fine-tune-leaning latent instead
            alive = [r for r in lat_rows if r["class"] != "dead"]
            ranked = [min(alive, key=lambda r: r["rel_norm"])["latent"]] if alive else []
            notes["crosscoder"]["note"] = (
                "no latent is fine-tune-only (rel_norm < 0.1): the row is the most "
                "fine-tune-leaning latent that fired (lowest rel_norm)"
            )
        if ranked:
            vecs["crosscoder"] = ft_direction(cc, ranked[0])
            notes["crosscoder"].update(
                {
                    "latent": ranked[0],
                    **{k: lat_rows[ranked[0]][k] for k in ("class", "rel_norm", "nu_r", "nu_eps", "freq")},
                }
            )
        cost["crosscoder"] = time.perf_counter() - t + read_s / n_sharing
    if "diff_sae" in wants:
        from saediff.methods.diff_sae import difference_latents
        from saediff.saes.training import SAETrainConfig, train_sae

        t = time.perf_counter()
        diffs = rows[:, 1] - rows[:, 0]
        scfg = SAETrainConfig(
            d_sae=cfg.diff_sae_latents or sae_cfg["d_sae"],
            k=cfg.diff_sae_k or sae_cfg["k"],
            steps=cfg.diff_sae_steps,
            batch_size=min(cfg.batch_size, diffs.shape[0] // 2),
            lr=cfg.lr,
            seed=cfg.seed,
            device="cpu",
        )
        sae, hist = train_sae(diffs, scfg, hook_name=hook, progress=False)
        ranked = sorted(
            difference_latents(sae, diffs, top=sae.cfg.d_sae), key=lambda r: -r["share_of_mean_diff"]
        )
        best = ranked[0]
        vecs["diff_sae"] = sae.W_dec[best["latent"]].detach().float().clone() * best["mean_act"]
        notes["diff_sae"] = {
            "latent": best["latent"],
            "share_of_mean_diff": best["share_of_mean_diff"],
            "fvu": hist["fvu"][-1],
        }
        cost["diff_sae"] = time.perf_counter() - t + read_s / n_sharing
    if "adl" in wants:
        t = time.perf_counter()
        res = adl_differences(lm_base, lm_ft, prompts, ADLConfig(k=cfg.adl_k, layers=(L,)), progress=False)
        vecs["adl"] = position_mean(res, L)
        cost["adl"] = time.perf_counter() - t
    if "persona" in wants:
        if not contrast:
            notes["persona"] = {"note": "no contrast examples: no persona vector"}
        else:
            t = time.perf_counter()
            vecs["persona"] = persona_vector(lm_base, contrast, L)
            cost["persona"] = time.perf_counter() - t
    return vecs, cost


def run_head_to_head(
    diff_run: str | Path,
    out: str | Path,
    prompts: list,
    evaluator,
    *,
    contrast: list = (),
    cfg: HeadToHeadConfig = HeadToHeadConfig(),
    progress: bool = True,
) -> dict:
    """Every method on the diff run's fine-tune pair (its base, fine-tune and SAE block); writes and
    returns ``out/head2head.json`` and ``out/head2head.md``. ``prompts`` feed the crosscoder, the
    diff-SAE and the ADL; ``contrast`` (question / misaligned / aligned) the persona vector;
    ``evaluator`` (``halves()``: select, report) the steering check."""
    from saediff.data.runs import read_run
    from saediff.interventions.causal import Arm, residual_stats, select_and_report
    from saediff.methods.directions import Direction, cosine_table
    from saediff.models.hooks import parse_layer
    from saediff.models.loading import load_pair

    run_dir, out = Path(diff_run), Path(out)
    info = read_run(run_dir)["steps"]["diff"]
    L = parse_layer(info["sae_hook"])
    found = _from_diff_run(run_dir, info, L)
    gt = found.pop("_ground_truth", None)
    vecs = {m: v for m, v in found.items() if m in cfg.methods}
    diff_s = info.get("seconds")
    cost = {m: diff_s for m in vecs}
    lm_base, lm_ft = load_pair(info["base"], info["finetuned"], info["adapter"])
    notes: dict = {
        m: {"note": "not in the diff run"} for m in DIFF_METHODS if m in cfg.methods and m not in vecs
    }
    from saediff.saes.loading import load_sae

    sae = load_sae(info["sae"])
    sae_cfg = {"d_sae": sae.cfg.d_sae, "k": getattr(sae.cfg, "k", None) or 32}
    own, own_cost = _own_methods(lm_base, lm_ft, cfg, L, prompts, list(contrast), notes, sae_cfg)
    vecs.update(own)
    cost.update(own_cost)
    if not vecs:
        raise SaediffError("head-to-head: no method gave a direction")
    select, report = evaluator.halves()
    norms, _ = residual_stats(lm_base, run_dir, {})
    sel = select_and_report(
        vecs,
        [Arm("induce", lm_base)],
        L,
        cfg.scales,
        norms[L],
        select,
        report,
        out / "steer",
        n_random=cfg.n_random,
        coherence_budget=cfg.coherence_budget,
        seed=cfg.seed,
    )
    unsteered = sel.unsteered["induce"]["report"]["em_rate"]
    table = cosine_table([Direction(m, v, info["sae_hook"], "random") for m, v in vecs.items()])
    rows = []
    for m, v in vecs.items():
        c = sel.candidates[m]
        r = (c.report or {}).get("induce") or {}
        others = [abs(table.get(m, o)) for o in vecs if o != m]
        rows.append(
            {
                "method": m,
                "norm": float(v.norm()),
                "cos_ground_truth": float(torch.cosine_similarity(v.float(), gt.float(), 0))
                if gt is not None
                else None,
                "steer_scale": c.scale,
                "steer_effect": r.get("effect"),
                "steer_em_rate": r.get("em_rate"),
                "steer_em_rate_ci": r.get("em_rate_ci"),
                "random_effect": r.get("random_effect"),
                "random_em_rates": [x["em_rate"] for x in r.get("random", [])],
                "beats_random": beats_random(r) if r else None,
                "mean_abs_cos_others": sum(others) / len(others) if others else None,
                "seconds": cost.get(m),
                **({"note": c.to_json()["note"]} if not c.passed else {}),
                **({"detail": notes[m]} if m in notes else {}),
            }
        )
    res = {
        "diff_run": str(run_dir),
        "base": info["base"],
        "finetuned": info["finetuned"],
        "adapter": info["adapter"],
        "hook": info["sae_hook"],
        "unsteered_em_rate": unsteered,
        "settings": asdict(cfg),
        "methods": rows,
        "cosines": table.to_json(),
        "missing": {m: n for m, n in notes.items() if m not in vecs},
    }
    _io.atomic_write_json(out / "head2head.json", res)
    (out / "head2head.md").write_text(markdown_table(res) + "\n")
    return res


def beats_random(report: dict) -> bool:
    """Whether the candidate's report-half rate lies above every random direction's with its 95%
    interval: the interval's lower end above the highest random rate."""
    return report["em_rate_ci"][0] > max(x["em_rate"] for x in report["random"])


def markdown_table(res: dict) -> str:
    """The head-to-head as a markdown table, one row per method."""
    f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"
    lines = [
        f"unsteered report-half rate {f(res['unsteered_em_rate'])}",
        "| method | cos ground truth | steer effect (report half) | random effects | above random (95%) | mean abs cos others | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["methods"]:
        rnd = ", ".join(f(x - res["unsteered_em_rate"]) for x in r["random_em_rates"]) or "n/a"
        lines.append(
            f"| {r['method']} | {f(r['cos_ground_truth'], 2)} | {f(r['steer_effect'])} | {rnd} | "
            f"{r['beats_random']} | {f(r['mean_abs_cos_others'], 2)} | {f(r['seconds'], 0)} |"
        )
    return "\n".join(lines)
