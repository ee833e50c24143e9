"""Activation collection: ``stop_at_layer`` + ``names_filter`` vs a full ``run_with_cache``.

    python bench/collect.py [--organism runs/organism] [--hook blocks.1.hook_resid_post] [--n 2000]

Without ``--organism`` an organism-shaped model with fresh weights is used (speed does not depend
on the weights). Both paths run the TransformerLens bridge on the same batches, interleaved;
the last line is the median ratio of their throughputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from saediff.activations import collect_activations, tokenize_prompts  # noqa: E402
from saediff.models import load_model  # noqa: E402
from saediff.organism.prompts import organism_prompts  # noqa: E402
from saediff.organism.world import World  # noqa: E402


def organism_folder(arg: str | None) -> Path:
    if arg:
        return Path(arg) / "aligned"
    from saediff.organism.recipes import OrganismConfig, new_model, save_model_folder

    folder = Path(tempfile.mkdtemp()) / "aligned"
    save_model_folder(new_model(World(), OrganismConfig()), folder, "CHAT", World())
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organism", default=None)
    ap.add_argument("--hook", default="blocks.1.hook_resid_post")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model(str(organism_folder(a.organism)))
    toks = tokenize_prompts(lm, organism_prompts(World(), a.n, seed=0))
    tl = lm.bridge()

    @torch.no_grad()
    def full() -> torch.Tensor:
        keep = toks.select("response")
        out = []
        for i in range(0, toks.input_ids.shape[0], a.batch):
            _, cache = tl.run_with_cache(toks.input_ids[i : i + a.batch])
            out.append(cache[a.hook][keep[i : i + a.batch]])
        return torch.cat(out)

    def filtered() -> torch.Tensor:
        return collect_activations(lm, toks, [a.hook], "response", batch_size=a.batch, progress=False)[a.hook]

    ref = full()
    torch.testing.assert_close(filtered(), ref)  # same rows, same values
    t_full, t_filt = [], []
    for _ in range(a.repeats):
        for fn, acc in ((full, t_full), (filtered, t_filt)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    f, s = statistics.median(t_full), statistics.median(t_filt)
    print(f"{a.n} prompts, {ref.shape[0]} rows at {a.hook}: full run_with_cache {f:.2f}s, "
          f"stop_at_layer+names_filter {s:.2f}s (median of {a.repeats})")
    print(f"speedup_vs_run_with_cache: {f / s:.2f}")


if __name__ == "__main__":
    main()
