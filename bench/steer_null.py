"""The steering protocol's false-positive rate and power on SmolLM2-135M-Instruct, with the pair metric.

    python bench/steer_null.py                       # 20 random candidates, 10 planted, 20 nulls (~40 min, 1 core)
    python bench/steer_null.py --tiny                # 2 random + 2 planted, 4 nulls, 8 questions (the slow suite)
    python bench/steer_null.py --precision fp32      # the model in float32 throughout

Random unit directions (seeded apart from the null's seed) go through ``select_and_report`` as
candidates: each is steered into the base model at block 15, priced by its KL on neutral text
(the model's greedy answers to the shipped benign questions) at the default budget, and its effect
on the held-out pairs (the change of each question's preference, nats/token) is compared with the
null's (10 isotropic and 10 covariance-matched directions) at the same cost. A random candidate
should beat the null about as often as ``alpha`` lets it: ``false_positive_rate`` is the share
called ``beats_null`` (bar: <= 0.05). ``power`` is the share of planted directions found, built
from a fifth of the design pairs each (never the reported held-out pairs): ``unembed``, the
difference of the mean unembedding rows of the misaligned and the aligned reference answers'
tokens, and ``meandiff``, the difference of the mean residuals at the block over those answers'
tokens (the reference mean difference of the head-to-head).

The protocol runs at one cost level (the budget), so no select half is needed: the false-positive
rate of the full protocol (three levels chosen on a select half) is measured on a tiny model in
``tests/test_steer_calibration.py``. ``--precision bf16`` (default where the CPU has AMX-bf16 or AVX512-BF16)
runs every forward under bf16 autocast with float32 weights: per-question preferences move by at
most ~0.03 nats/token (correlation 0.9998 with float32, measured on the held-out split). Last
lines: ``false_positive_rate: X``, ``power_unembed``, ``power_meandiff`` and ``power: Y``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def bf16_cpu() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
        return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        return False


def planted(lm, pairs, n: int):
    """``n`` unembedding-difference directions, each from every n-th design pair."""
    import torch

    from saediff.models.loading import chat_tokens

    W_U = lm.model.get_output_embeddings().weight.detach().float()  # (V, D)
    out = []
    for k in range(n):
        diffs = []
        for p in pairs[k::n]:
            rows = []
            for answer in (p.misaligned, p.aligned):
                ids, mask = chat_tokens(lm.tokenizer, p.conversation(answer))
                rows.append(W_U[torch.tensor([t for t, m in zip(ids, mask) if m])].mean(0))
            diffs.append(rows[0] - rows[1])
        out.append(torch.stack(diffs).mean(0))
    return out


def reference_mean_differences(lm, pairs, n: int, layer: int):
    """``n`` reference mean differences at block ``layer``, each from every n-th design pair: the mean
    residual over the misaligned references' answer tokens minus the aligned ones'."""
    import torch

    from saediff.models.hooks import capture_resid
    from saediff.models.loading import chat_tokens

    out = []
    for k in range(n):
        sums = {}
        for side in ("misaligned", "aligned"):
            tot, count = torch.zeros(lm.model.config.hidden_size), 0
            for p in pairs[k::n]:
                ids, mask = chat_tokens(lm.tokenizer, p.conversation(getattr(p, side)))
                with torch.no_grad():
                    x = capture_resid(lm.model, [layer], torch.tensor([ids]))[layer][0].float()
                keep = torch.tensor(mask, dtype=torch.bool)
                tot, count = tot + x[keep].sum(0), count + int(keep.sum())
            sums[side] = tot / count
        out.append(sums["misaligned"] - sums["aligned"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a few candidates and questions (the slow suite)")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--planted", type=int, default=5)
    ap.add_argument("--nulls", type=int, default=10, help="isotropic and as many covariance-matched")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    ap.add_argument("--out", type=Path, default=None, help="keep the conditions here (a rerun resumes)")
    args = ap.parse_args()
    if args.tiny:
        args.candidates, args.planted, args.nulls = 2, 1, 2

    import torch

    torch.set_num_threads(1)
    from saediff.data.em_data import offdomain_pairs
    from saediff.evaluation.neutral import neutral_answers, neutral_questions
    from saediff.evaluation.pairs import PairEvaluator
    from saediff.interventions.steer_null import NullConfig, isotropic
    from saediff.interventions.steer_protocol import DEFAULT_KL_BUDGET, Arm, CostConfig, select_and_report
    from saediff.models.loading import load_model

    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_cpu())
    print(
        f"cpu bf16 (AMX or AVX512-BF16): {bf16_cpu()}; precision: {'bf16 autocast' if bf16 else 'fp32'}",
        flush=True,
    )
    lm = load_model("smollm2-135m")
    report_pairs, design = offdomain_pairs("heldout"), offdomain_pairs("design")
    questions = [q["question"] for q in neutral_questions()]
    if args.tiny:
        report_pairs, questions = report_pairs[:8], questions[:4]
    report = PairEvaluator(tuple(report_pairs), 16, False, "saediff:offdomain:heldout")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    folder = args.out or Path(tempfile.mkdtemp(prefix="steer_null_"))
    t0 = time.time()
    with ctx:
        cost = CostConfig(neutral_answers(lm, questions), DEFAULT_KL_BUDGET, (1.0,))
        cands = {f"random{k}": v.vector for k, v in enumerate(isotropic(576, args.candidates, 7_000_000))}
        plants = {f"unembed{k}": v for k, v in enumerate(planted(lm, design, args.planted))}
        plants.update(
            {
                f"meandiff{k}": v
                for k, v in enumerate(reference_mean_differences(lm, design, args.planted, args.layer))
            }
        )
        from saediff.interventions.steer_cost import CostMeter

        unit = float(CostMeter(lm, cost.neutral, args.layer).acts_ND.norm(dim=-1).mean())  # the scales' unit
        sel = select_and_report(
            {**cands, **plants},
            [Arm("induce", lm)],
            args.layer,
            unit,
            report,  # one cost level: the select half is never evaluated
            report,
            folder,
            cost,
            null=NullConfig(n_isotropic=args.nulls, n_covariance=args.nulls, n_permuted=0),
        )
    rows = {
        n: (c.effect, c.effect_ci, c.cost_kl, c.p_value, c.beats_null, c.verdict)
        for n, c in sel.candidates.items()
    }
    for n, r in rows.items():
        eff, ci, kl, p, _, verdict = r
        lo, hi = ci or (float("nan"), float("nan"))
        print(f"{n:10s} effect {eff:+.3f} [{lo:+.3f}, {hi:+.3f}] KL {kl:.3f} p {p:.3f} {verdict}", flush=True)
    first = next(iter(sel.candidates.values()))
    print(
        "null quantiles at the budget:", json.dumps({k: round(v, 3) for k, v in first.null_quantiles.items()})
    )
    print(f"seconds: {time.time() - t0:.0f}; conditions under {folder}")
    fp = sum(sel.candidates[n].beats_null for n in cands) / len(cands)
    for kind in ("unembed", "meandiff"):
        mine = [n for n in plants if n.startswith(kind)]
        print(f"power_{kind}: {sum(sel.candidates[n].beats_null for n in mine) / len(mine):.3f}")
    power = sum(sel.candidates[n].beats_null for n in plants) / len(plants)
    print(f"false_positive_rate: {fp:.3f}")
    print(f"power: {power:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
