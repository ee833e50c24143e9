"""Peak memory of one diff batch of long answers through a wide SAE: ``DiffAccumulator`` encoding
the batch's rows 2048 at a time (saediff's default) against encoding them all at once (the
baseline: what it did before, and what a plain ``sae.encode`` of the batch does).

    python bench/diff_chunk_memory.py                  # 8 answers x 600 tokens, d_model 896, 32768 latents
    python bench/diff_chunk_memory.py --rows 9600 --d-sae 65536

Each measurement is its own process (peak RSS, ``ru_maxrss``, minus the process's RSS before the
update), interleaved over ``--repeats``; the results of the two must agree. Last lines:
``time_ratio: X`` (chunked seconds / whole seconds) and ``memory_ratio: Y`` (chunked peak / whole
peak; below 1 is less memory).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings

from _children import add_child_options, medians, run_as_child, run_children

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")


def one_run(args, chunk: int) -> dict:
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from saediff.methods.sae_diff import DiffAccumulator

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=args.d_model,
            d_sae=args.d_sae,
            k=64,
            metadata=SAEMetadata(hook_name="blocks.2.hook_resid_post"),
        )
    )
    with torch.no_grad():
        sae.W_enc.normal_()
    g = torch.Generator().manual_seed(1)
    base = torch.randn(args.rows, args.d_model, generator=g)
    ft = base + 0.1 * torch.randn(args.rows, args.d_model, generator=g)
    acc = DiffAccumulator(sae, chunk=chunk)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    acc.update(base, ft)
    res = acc.result()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {
        "seconds": seconds,
        "peak_mib": peak,
        "delta_sum": float(res.delta.double().sum()),
        "top": acc.card(0).top_ft[0]["row"] if acc.card(0).top_ft else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4800, help="response tokens in the batch")
    ap.add_argument("--d-model", type=int, default=896)
    ap.add_argument("--d-sae", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=2048)
    add_child_options(ap, repeats=2, child_type=int)
    args = ap.parse_args()
    if run_as_child(args, one_run):
        return
    runs = run_children(
        __file__, sys.argv[1:], {"chunked": str(args.chunk), "whole": str(10**12)}, args.repeats
    )
    a, b = runs["chunked"][0], runs["whole"][0]
    if abs(a["delta_sum"] - b["delta_sum"]) > 1e-3 * max(1.0, abs(b["delta_sum"])) or a["top"] != b["top"]:
        sys.exit(f"chunked and whole results differ: {a} vs {b}")
    med = medians(runs, ("seconds", "peak_mib"))
    print(f"one batch of {args.rows} rows, d_model {args.d_model}, TopK SAE {args.d_sae} latents")
    for n, m in med.items():
        print(f"{n:8s}: {m['seconds']:6.2f} s, peak RSS above the start {m['peak_mib']:7.0f} MiB")
    print(f"time_ratio: {med['chunked']['seconds'] / med['whole']['seconds']:.3f}")
    print(f"memory_ratio: {med['chunked']['peak_mib'] / med['whole']['peak_mib']:.3f}")


if __name__ == "__main__":
    main()
