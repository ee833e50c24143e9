"""SAE training throughput: saediff's loop vs SAELens's ``SAETrainer``, same data and settings.

    python bench/sae_train.py                      # CPU: d_in 128, d_sae 2048, k 16
    python bench/sae_train.py --d-in 896 --d-sae 16384 --k 64 --batch 4096 --device cuda --autocast

Both train a TopK SAE (AuxK on) for the same number of steps and batch size on the same
in-memory activations (sparse combinations of a hidden dictionary plus noise), interleaved in one
process; FVU is measured on held-out rows. The last line is the median tokens/s ratio.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def synthetic_acts(n: int, d_in: int, n_true: int, k_true: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_true, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.randint(0, n_true, (n, k_true), generator=g)
    coef = torch.rand(n, k_true, generator=g) * 3
    x = torch.nn.functional.embedding_bag(idx, D, per_sample_weights=coef, mode="sum")
    return x + 0.05 * torch.randn(n, d_in, generator=g)


def batches(data: torch.Tensor, bs: int, device: str):
    data = data.to(device)
    for i in itertools.cycle(range(0, data.shape[0] - bs + 1, bs)):
        yield data[i : i + bs]


def fvu(encode_decode, x: torch.Tensor) -> float:
    with torch.no_grad():
        xh = encode_decode(x)
        return float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def run_saediff(data, held, a) -> tuple[float, float]:
    from saediff.saes import SAETrainConfig, train_sae

    cfg = SAETrainConfig(arch="topk", d_sae=a.d_sae, k=a.k, steps=a.steps, batch_size=a.batch, lr=a.lr,
                         warmup_steps=0, decay_fraction=0.0, device=a.device, autocast=a.autocast,
                         compile=a.compile, sparse_decode=a.device == "cpu")
    sync(a.device)
    t0 = time.perf_counter()
    sae, _ = train_sae(batches(data, a.batch, a.device), cfg, progress=False)
    sync(a.device)
    dt = time.perf_counter() - t0
    return a.steps * a.batch / dt, fvu(lambda x: sae.decode(sae.encode(x)), held)


def run_saelens(data, held, a) -> tuple[float, float]:
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=data.shape[1], d_sae=a.d_sae, k=a.k, device=a.device))
    cfg = SAETrainerConfig(total_training_samples=a.steps * a.batch, train_batch_size_samples=a.batch, lr=a.lr,
                           lr_end=a.lr, device=a.device, autocast=a.autocast,
                           logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches(data, a.batch, a.device))
    sync(a.device)
    t0 = time.perf_counter()
    trained = trainer.fit()
    sync(a.device)
    dt = time.perf_counter() - t0
    trained = trained.cpu()
    return a.steps * a.batch / dt, fvu(lambda x: trained.decode(trained.encode(x)), held)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = a.batch * 32
    data = synthetic_acts(n, a.d_in, n_true=a.d_sae, k_true=a.k // 2, seed=0)
    held = synthetic_acts(4096, a.d_in, n_true=a.d_sae, k_true=a.k // 2, seed=0)[:2048]
    warm = argparse.Namespace(**{**vars(a), "steps": 5})
    run_saediff(data, held, warm), run_saelens(data, held, warm)  # first-call costs, discarded
    ours, theirs = [], []
    for r in range(a.repeats):  # interleaved: the host is noisy
        ours.append(run_saediff(data, held, a))
        theirs.append(run_saelens(data, held, a))
        print(f"repeat {r}: saediff {ours[-1][0]:,.0f} tok/s (FVU {ours[-1][1]:.4f})   "
              f"SAELens {theirs[-1][0]:,.0f} tok/s (FVU {theirs[-1][1]:.4f})", flush=True)
    o = statistics.median(x for x, _ in ours)
    t = statistics.median(x for x, _ in theirs)
    print(f"d_in {a.d_in} d_sae {a.d_sae} k {a.k} batch {a.batch} steps {a.steps} device {a.device}: "
          f"saediff {o:,.0f} tok/s, SAELens {t:,.0f} tok/s; FVU saediff {statistics.median(f for _, f in ours):.4f} "
          f"SAELens {statistics.median(f for _, f in theirs):.4f}")
    print(f"speedup_vs_saelens: {o / t:.2f}")


if __name__ == "__main__":
    main()
