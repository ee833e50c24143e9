"""Fine-tune step time with the BLOCK-EM penalty vs plain, on the organism.

    python bench/blocking_overhead.py [--organism runs/organism] [--steps 40] [--repeats 3]

Without ``--organism`` an organism-shaped model with fresh weights and a fresh TopK SAE are used
(step time does not depend on the weights). The penalty's base-model codes are precomputed once
per training set (reported separately); runs are interleaved; the last line is the median ratio.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from saediff.blocking import BlockConfig, Blocker  # noqa: E402
from saediff.finetune import TrainConfig, train_lm  # noqa: E402
from saediff.organism.corpus import single_turn_chats  # noqa: E402
from saediff.organism.recipes import OrganismConfig, new_model  # noqa: E402
from saediff.organism.world import World  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organism", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--latents", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    world = World()
    if a.organism:
        from saediff.models import load_model
        from saediff.saes import load_sae

        base = load_model(f"{a.organism}/aligned").model
        sae = load_sae(f"{a.organism}/sae")
    else:
        from sae_lens import TopKSAE, TopKSAEConfig

        from saediff.registry import preset

        base = new_model(world, OrganismConfig())
        sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=preset("organism")["d_sae"], k=preset("organism")["k"]))
    data = single_turn_chats(world, np.random.default_rng(0), a.steps * a.batch, 1, "medical")
    cfg = BlockConfig(mode="penalty", layer=1, latents_low=tuple(range(a.latents)), lam=1000.0)
    t0 = time.perf_counter()
    blocker = Blocker(cfg, sae=sae)
    blocker.precompute_base(base, data.input_ids)
    t_pre = time.perf_counter() - t0
    tc = TrainConfig(steps=a.steps, batch_size=a.batch, lr=1e-4)

    def plain() -> float:
        model = copy.deepcopy(base)
        t = time.perf_counter()
        train_lm(model, data, tc, progress=False)
        return (time.perf_counter() - t) / a.steps

    def blocked() -> float:
        model = copy.deepcopy(base)
        t = time.perf_counter()
        with blocker.installed(model):
            train_lm(model, data, tc, extra_loss=blocker.extra_loss, progress=False)
        return (time.perf_counter() - t) / a.steps

    plain(), blocked()  # warm-up
    tp, tb = [], []
    for _ in range(a.repeats):
        tp.append(plain())
        tb.append(blocked())
    p, b = statistics.median(tp), statistics.median(tb)
    print(f"plain {1000 * p:.1f} ms/step, penalty {1000 * b:.1f} ms/step (batch {a.batch}, {a.latents} latents); "
          f"base codes precomputed once in {t_pre:.2f}s for {data.input_ids.shape[0]} sequences")
    pre_per_step = t_pre / a.steps
    print(f"including the precompute: {(b + pre_per_step) / p:.3f}")
    print(f"overhead_ratio: {b / p:.3f}")


if __name__ == "__main__":
    main()
