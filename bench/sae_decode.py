"""saediff's TopK SAE step with the sparse decode (``embedding_bag`` over the k active decoder rows)
against the dense reference (codes scattered into a (B, d_sae) matrix, then a matmul), and what
``sparse_decode="auto"`` picks on this device and shape.

    python bench/sae_decode.py                                  # CPU: d_in 128, d_sae 16384, k 16
    python bench/sae_decode.py --d-in 896 --d-sae 16384 --k 64 --batch 4096 --device cuda --autocast
    python bench/sae_decode.py --device cuda --compile          # each path under torch.compile

Both train the same SAE (``saediff.saes.train_sae``, same seed, data, steps and batch) on
synthetic activations; they agree to float rounding (tests/test_saes.py). Runs are interleaved
over the repeats; tokens/s is steps x batch over the training wall time (first-call costs run
once before and are discarded). Last line: ``sparse_vs_dense: X`` (sparse tokens/s / dense, median).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from sae_train import synthetic_acts, sync  # noqa: E402


def tokens_per_s(data: torch.Tensor, a, sparse) -> tuple[float, dict]:
    from saediff.saes import SAETrainConfig, train_sae

    cfg = SAETrainConfig(arch="topk", d_sae=a.d_sae, k=a.k, steps=a.steps, batch_size=a.batch, lr=2e-3,
                         warmup_steps=0, decay_fraction=0.0, device=a.device, autocast=a.autocast, compile=a.compile,
                         sparse_decode=sparse)
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
    for sparse in (True, False):
        tokens_per_s(data, warm, sparse)
    res: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(a.repeats):
        for sparse in (True, False):
            res[sparse].append(tokens_per_s(data, a, sparse)[0])
    logging.basicConfig(level=logging.WARNING)
    _, hist = tokens_per_s(data, argparse.Namespace(**{**vars(a), "steps": 1}), "auto")
    sp, de = statistics.median(res[True]), statistics.median(res[False])
    print(f"d_in {a.d_in} d_sae {a.d_sae} k {a.k} batch {a.batch} on {a.device}"
          f"{' autocast' if a.autocast else ''}{' compile' if a.compile else ''}: sparse {sp:,.0f} tok/s, "
          f"dense {de:,.0f} tok/s; auto picks {'sparse' if hist['sparse_decode'] else 'dense'}")
    print(f"sparse_vs_dense: {sp / de:.3f}")


if __name__ == "__main__":
    main()
