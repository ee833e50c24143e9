"""Activation collection: ``saediff.activations.collect.collect_activations`` against the two loops a
careful user would write instead, on the same batches and rows.

    python bench/collect.py                                        # organism-shaped model, fresh weights
    python bench/collect.py --organism runs/organism               # the trained organism
    python bench/collect.py --model smollm2-135m --hook blocks.15.hook_resid_post --n 200
    python bench/collect.py --model path/to/hf_folder --hook blocks.12.hook_resid_post --device cuda

Baselines, each configured as cheaply as its library allows:
- ``run_with_cache(names_filter=[hook], stop_at_layer=L + 1)`` on the TransformerLens bridge (what
  a TransformerLens user writes once they know to filter and stop early);
- a plain HF forward-hook loop: a hook on decoder layer L that keeps its output and raises to stop
  the forward there, on the HF model itself (no bridge).
All three read the answer-token rows of the same right-padded batches (cut to their longest row)
under ``torch.no_grad``, at fp32 (bf16 gains are ``bench/model_side.py``'s); the rows are checked
equal first. The bridge wraps its own copy of the model (building it rewires the model in place).
Runs are interleaved over the repeats. What saediff skips that the loops compute (a causal model's
work that cannot reach a kept row, padding it can avoid) is listed in ``collect._forward_rows``
and ``collect._ResidRows``: same batches in, same rows out, fewer positions run.
Last lines: ``speedup_vs_run_with_cache_filtered: X`` and ``speedup_vs_hf_hooks: X`` (baseline
seconds / saediff seconds, medians).
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

import torch

from saediff.activations.collect import collect_activations, tokenize_prompts
from saediff.models.loading import ModelSpec, load_model


def organism(arg: str | None):
    from saediff.stories.organism.prompts import organism_prompts
    from saediff.stories.organism.world import World

    if arg:
        folder = Path(arg) / "aligned"
    else:
        from saediff.stories.organism.recipes import OrganismConfig, new_model, save_model_folder

        folder = Path(tempfile.mkdtemp()) / "aligned"
        save_model_folder(new_model(World(), OrganismConfig()), folder, "CHAT", World())
    return str(folder), lambda n: organism_prompts(World(), n, seed=0)


def chat_prompts(n: int):
    """Prompts with responses from the shipped EM chat data (the bad-advice rows, then the good)."""
    from saediff.data.chat_data import load_chat_jsonl
    from saediff.data.em_data import data_path
    from saediff.data.prompts import Prompt

    rows = [c for name in ("medical_bad", "medical_good") for c in load_chat_jsonl(data_path(name))][:n]
    return [Prompt(f"r{i}", c[:-1], response=c[-1]["content"]) for i, c in enumerate(rows)]


class _Stop(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organism", default=None)
    ap.add_argument(
        "--model", default=None, help="an HF folder, FILE.gguf or smollm2-135m instead of the organism"
    )
    ap.add_argument("--hook", default="blocks.1.hook_resid_post")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model:
        folder, prompts = a.model, chat_prompts
    else:
        folder, prompts = organism(a.organism)
    # fp32 on every side: this bench compares collection, not arithmetic (bf16: bench/model_side.py).
    # The bridge rewires the model it wraps, so it gets its own copy; the HF loop and saediff run
    # on a plain one.
    spec = ModelSpec(folder, device=a.device, precision="fp32")
    lm, tl = load_model(spec), load_model(spec).bridge()
    toks = tokenize_prompts(lm, prompts(a.n))
    keep = toks.select("response")
    layer = int(a.hook.split(".")[1])
    from saediff.models.hooks import decoder_layers

    block = decoder_layers(lm.model)[layer]
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)

    def batches():
        for i in range(0, toks.input_ids.shape[0], a.batch):
            ids, attn, m = toks.batch(slice(i, i + a.batch), keep)
            yield ids.to(a.device), attn.to(a.device), m.to(a.device)

    @torch.no_grad()
    def tl_filtered() -> torch.Tensor:
        out = []
        for ids, _, m in batches():
            _, cache = tl.run_with_cache(ids, names_filter=[a.hook], stop_at_layer=layer + 1)
            out.append(cache[a.hook][m].cpu())
        return torch.cat(out)

    @torch.no_grad()
    def hf_hooks() -> torch.Tensor:
        out, got = [], {}

        def hook(_mod, _inp, o):
            got["h"] = o[0] if isinstance(o, tuple) else o
            raise _Stop

        handle = block.register_forward_hook(hook)
        try:
            for ids, attn, m in batches():
                try:
                    lm.model(input_ids=ids, attention_mask=attn)
                except _Stop:
                    pass
                out.append(got["h"][m].cpu())
        finally:
            handle.remove()
        return torch.cat(out)

    def saediff() -> torch.Tensor:
        return collect_activations(lm, toks, [a.hook], "response", batch_size=a.batch, progress=False)[a.hook]

    ref = saediff()
    for fn in (tl_filtered, hf_hooks):
        torch.testing.assert_close(fn().float(), ref.float(), atol=1e-4, rtol=1e-4)  # same rows, same values
    times: dict[str, list[float]] = {"saediff": [], "tl_filtered": [], "hf_hooks": []}
    fns = {"saediff": saediff, "tl_filtered": tl_filtered, "hf_hooks": hf_hooks}
    for _ in range(a.repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{folder if a.model else 'organism'}: {toks.input_ids.shape[0]} prompts, {ref.shape[0]} answer rows at "
        f"{a.hook} on {a.device}: saediff {med['saediff']:.2f}s, run_with_cache(names_filter, stop_at_layer) "
        f"{med['tl_filtered']:.2f}s, HF forward hook with early stop {med['hf_hooks']:.2f}s (median of {a.repeats})"
    )
    print(f"speedup_vs_run_with_cache_filtered: {med['tl_filtered'] / med['saediff']:.2f}")
    print(f"speedup_vs_hf_hooks: {med['hf_hooks'] / med['saediff']:.2f}")


if __name__ == "__main__":
    main()
