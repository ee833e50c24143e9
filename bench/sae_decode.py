"""saediff's TopK SAE step kernels against the dense reference (codes scattered into a (B, d_sae)
matrix, autograd through dense matmuls): ``sparse_decode`` (an ``embedding_bag`` over the k active
decoder rows) and ``sparse`` (that, and the encoder's backward at the selected latents only), and
what ``kernel="auto"`` picks on this device and shape.

    python bench/sae_decode.py                                  # CPU: d_in 128, d_sae 16384, k 16
    python bench/sae_decode.py --d-in 896 --d-sae 16384 --k 64 --batch 4096 --device cuda --autocast
    python bench/sae_decode.py --device cuda --compile          # each path under torch.compile

Both train the same SAE (``saediff.saes.training.train_sae``, same seed, data, steps and batch) on
synthetic activations; they agree to float rounding (tests/test_saes.py). Runs are interleaved
over the repeats; tokens/s is steps x batch over the training wall time (first-call costs run
once before and are discarded). Last lines: ``sparse_decode_vs_dense: X`` and ``sparse_vs_dense: Y`` (tokens/s over the dense
kernel's, medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import torch
from sae_train import sync, synthetic_acts


def tokens_per_s(data: torch.Tensor, a, kernel: str) -> tuple[float, dict]:
    from saediff.saes.training import SAETrainConfig, train_sae

    cfg = SAETrainConfig(
        arch="topk",
        d_sae=a.d_sae,
        k=a.k,
        steps=a.steps,
        batch_size=a.batch,
        lr=2e-3,
        warmup_steps=0,
        decay_fraction=0.0,
        device=a.device,
        autocast=a.autocast,
        compile=a.compile,
        kernel=kernel,
    )
    sync(a.device)
    t = time.perf_counter()
    _, hist = train_sae(data, cfg, progress=False)
    sync(a.device)
    return a.steps * a.batch / (time.perf_counter() - t), hist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--autocast", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = synthetic_acts(a.batch * 16, a.d_in, n_true=a.d_sae, k_true=a.k // 2, seed=0)
    warm = argparse.Namespace(**{**vars(a), "steps": 3})
    kernels = ("dense", "sparse_decode", "sparse")
    for kernel in kernels:
        tokens_per_s(data, warm, kernel)
    res: dict[str, list[float]] = {k: [] for k in kernels}
    for _ in range(a.repeats):
        for kernel in kernels:
            res[kernel].append(tokens_per_s(data, a, kernel)[0])
    _, hist = tokens_per_s(data, argparse.Namespace(**{**vars(a), "steps": 1}), "auto")
    med = {k: statistics.median(v) for k, v in res.items()}
    print(
        f"d_in {a.d_in} d_sae {a.d_sae} k {a.k} batch {a.batch} on {a.device}"
        f"{' autocast' if a.autocast else ''}{' compile' if a.compile else ''}: "
        + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in med.items())
        + f"; auto picks {hist['kernel']}"
    )
    print(f"sparse_decode_vs_dense: {med['sparse_decode'] / med['dense']:.3f}")
    print(f"sparse_vs_dense: {med['sparse'] / med['dense']:.3f}")


if __name__ == "__main__":
    main()
