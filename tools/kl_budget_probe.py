"""How the default steering budget (``steer_protocol.DEFAULT_KL_BUDGET``) was chosen: on the design
split only, the effect of directions known to move the pair metric against null directions, at
five costs.

    python tools/kl_budget_probe.py --out /tmp/kl_budget     # ~1 h on one core (bf16 autocast)

SmolLM2-135M-Instruct, block 15. The design split's pairs alternate into half A (builds the
directions) and half B (measures them). Directions: the reference mean difference of half A
(``refdiff``), two unembedding differences of half A's references (``planted0/1``), and null
directions (``--nulls`` isotropic and as many covariance-matched). Each is scaled to cost 0.05,
0.1, 0.2, 0.4 and 0.8 nats per neutral token, and its effect (the change of each half-B
question's preference, with its paired interval) is printed per cost. The budget is the smallest
cost whose separation (a known direction's effect over the largest null effect at that cost) is
within 10% of the best. Measured (2026-12-07, the first three isotropic nulls at every cost, the fourth at
two; the run was stopped before the covariance-matched ones): the separation peaks at 0.1 (refdiff 4.1x,
planted0 1.7x; 4.0x and 1.7x at 0.2, 3.8x and 1.6x at 0.05, 3.3x and 1.5x at 0.4, 2.7x and 1.3x at
0.8), so the default is 0.1. The table is in docs/workflows/steer.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COSTS = (0.05, 0.1, 0.2, 0.4, 0.8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="conditions are kept here (a rerun resumes)")
    ap.add_argument("--nulls", type=int, default=4)
    ap.add_argument("--layer", type=int, default=15)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from steer_null import planted, reference_mean_differences

    from saediff.data.em_data import offdomain_pairs
    from saediff.evaluation.neutral import neutral_answers
    from saediff.evaluation.pairs import PairEvaluator
    from saediff.interventions.steer_null import NullConfig, covariance_matched, isotropic
    from saediff.interventions.steer_protocol import Arm, CostConfig, _Protocol
    from saediff.models.loading import load_model

    lm = load_model("smollm2-135m")
    design = offdomain_pairs("design")
    half_a, half_b = design[0::2], design[1::2]
    ev_b = PairEvaluator(tuple(half_b), 16, False, "design-B")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = CostConfig(neutral_answers(lm), max(COSTS), tuple(c / max(COSTS) for c in COSTS))
        run = _Protocol([Arm("induce", lm)], args.layer, 1.0, ev_b, ev_b, args.out, cost, NullConfig(), {})
        base = run.em(run.arms[0], ev_b, "base")
        run.ref = {"induce": {"select": base, "report": base}}
        acts = run.meter(run.arms[0]).acts_ND
        run.unit = float(acts.norm(dim=-1).mean())
        dirs = {"refdiff": reference_mean_differences(lm, half_a, 1, args.layer)[0]}
        dirs.update({f"planted{k}": v for k, v in enumerate(planted(lm, half_a, 2))})
        nulls = isotropic(acts.shape[1], args.nulls, 11) + covariance_matched(acts, args.nulls, 22)
        dirs.update({d.name: d.vector for d in nulls})
        print("direction cost scale(x unit) kl effect ci seconds", flush=True)
        for name, v in dirs.items():
            u = v / v.norm()
            for c in COSTS:
                t = time.time()
                alpha, kl, _ = run.scale_at(u, c)
                e = run.effects(ev_b, f"{name}_c{c:g}", u, alpha)["total"]
                lo, hi = e["effect_ci"]
                print(
                    f"{name} {c:g} {alpha / run.unit:.3f} {kl:.3f} {e['effect']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                    f"{time.time() - t:.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
