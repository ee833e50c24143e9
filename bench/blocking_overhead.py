"""BLOCK-EM's cost against plain fine-tunes of the same model, all through saediff's Trainer path
(``saediff.interventions.finetune.finetune``): per step (LoRA and full fine-tunes, base codes per step or cached
once per row) and for a whole sweep.

    python bench/blocking_overhead.py                       # CPU: a random Qwen2-shaped model (d 256, 4 layers)
    python bench/blocking_overhead.py --shape 0.5b --seq 256 --batch 8 --steps 30    # GPU: Qwen2.5-0.5B-shaped, bf16
    python bench/blocking_overhead.py --model path/to/hf_folder --sae path/to/sae
    python bench/blocking_overhead.py --lora-layers sae     # a narrow adapter on the SAE's block only
    python bench/blocking_overhead.py --no-full --no-sweep  # the LoRA step rows only

The base model's codes of the blocked latents depend only on the row, the base model and the SAE.
Read per step (``blocked``), they cost a partial forward: from the first adapted block to the
SAE's with the adapter disabled (LoRA), or through a frozen copy of the blocks up to the SAE's
(full fine-tune: ``saediff.interventions.block_runs._reference``, in float32 like the trained weights). Cached
(``cached``, ``saediff.interventions.base_codes``, what ``run_block_em`` and the chat demo use), they are
computed once per row before training and read back per batch: the step then adds only an SAE
encode of the chosen latents on the live residual, and a full fine-tune builds no copy.

The sweep (``--sweep``) is what ``saediff block`` runs: a plain fine-tune, then a penalty run at
each of two lambdas and a run with as many random latents at each (5 runs), each ``--epochs``
epochs over ``--rows`` rows, with the base codes of all four penalty runs' latents computed once
(timed in) - against 5 plain fine-tunes on the same rows. Wall seconds of training (model load
excluded, the same for both).

Each measurement is its own process (peak memory is per process: on GPU
``torch.cuda.max_memory_allocated`` from just before training; on CPU the peak resident size
minus the resident size before the model is built, so the interpreter and libraries (~600 MiB)
do not dilute the ratio); runs are interleaved (plain, blocked, ...) and medians over the repeats
compared. Ratio lines come last: ``overhead_ratio`` / ``memory_ratio`` (LoRA, base codes per
step / plain; the targets for the cached path are <= 1.05 and <= 1.3), ``cached_overhead_ratio`` /
``cached_memory_ratio``, then unless ``--no-full`` the same four for full fine-tunes, and unless
``--no-sweep`` ``sweep_ratio`` last (sweep / 5 plain fine-tunes; target <= 1.15).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import warnings

from _children import add_child_options, medians, run_as_child, run_children

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

SHAPES = {  # hidden, layers, mlp, heads, kv heads, vocab
    "tiny": (256, 4, 1024, 4, 2, 4096),
    "0.5b": (896, 24, 4864, 14, 2, 151936),
}


def _model(args):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if args.model:
        from saediff.models.loading import ModelSpec, load_model

        return load_model(ModelSpec(args.model, device=args.device)).model
    d, n, m, h, kv, v = SHAPES[args.shape]
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=v,
        hidden_size=d,
        num_hidden_layers=n,
        intermediate_size=m,
        num_attention_heads=h,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return Qwen2ForCausalLM(cfg).to(args.device, dtype)


def _sae(args, d_model: int, layer: int):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    if args.sae:
        from saediff.saes.loading import load_sae

        return load_sae(args.sae)
    return TopKSAE(
        TopKSAEConfig(
            d_in=d_model,
            d_sae=args.d_sae,
            k=32,
            metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post"),
        )
    )


STEP_VARIANTS = ("plain", "blocked", "cached")


class _Tok:  # what finetune() needs of a tokenizer for pre-tokenized data
    pad_token_id, eos_token_id = 0, 0


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def one_run(args, variant: str) -> dict:
    """One measurement in this process: ``plain``, ``blocked``, ``cached`` (LoRA; ``full_...`` for a
    full fine-tune): per-step times and peak memory; ``sweep`` / ``sweep_plain``: the wall time of
    the five runs."""
    import tempfile

    import torch
    from transformers import TrainerCallback

    from saediff.interventions.base_codes import BaseCodes
    from saediff.interventions.block_runs import _reference
    from saediff.interventions.blocking import BlockConfig, Blocker
    from saediff.interventions.finetune import FinetuneConfig, finetune, make_trainable
    from saediff.models.hooks import decoder_layers
    from saediff.saes.loading import check_sae_fits

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    rss0 = _rss_mib()
    model = _model(args)
    n_layers = len(decoder_layers(model))
    layer = n_layers // 2
    sae = _sae(args, model.config.hidden_size, layer)
    layer = check_sae_fits(sae, model, "bench")
    sweep = variant.startswith("sweep")
    method = "full" if variant.startswith("full") else "lora"
    n_rows = args.rows if sweep else args.steps * args.batch
    steps = args.epochs * n_rows // args.batch if sweep else args.steps
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (n_rows, args.seq), generator=g)
    half = args.seq // 2
    data = [{"input_ids": r.tolist(), "labels": [-100] * half + r[half:].tolist()} for r in ids]
    lora_layers = None if args.lora_layers == "all" else (layer,)
    ft = FinetuneConfig(
        method=method,
        lora_rank=1,
        lora_modules=("down_proj",),
        lora_layers=lora_layers,
        steps=steps,
        batch_size=args.batch,
        lr=1e-4 if method == "lora" else 1e-5,
        precision="bf16" if cuda else "fp32",
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # from here: float32 masters, reference, training
    n = args.latents
    sets = [
        (tuple(range(n)), tuple(range(n, 2 * n))),
        (tuple(range(2 * n, 3 * n)), tuple(range(3 * n, 4 * n))),
    ]
    work = tempfile.mkdtemp(prefix="saediff_bench_block_")
    times: list[float] = []

    class _Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    def train(blocked, latents=sets[0], codes=None, lam=1e4) -> None:
        m = make_trainable(
            _model(args) if sweep else model, ft
        )  # a sweep starts each run from the base model
        if not blocked:
            finetune(m, _Tok(), data, ft, work, callbacks=[_Clock()], progress=False)
            return
        ref = _reference(m, layer) if method == "full" and codes is None else None
        blocker = Blocker(
            BlockConfig("penalty", layer, *latents, lam), sae=sae, reference=ref, base_codes=codes
        )
        with blocker.installed(m):
            finetune(m, _Tok(), data, ft, work, extra=blocker, callbacks=[_Clock()], progress=False)

    def cache(m, latents) -> BaseCodes:
        m = make_trainable(m, ft)
        codes = BaseCodes.build(
            m,
            data,
            sae,
            layer,
            latents,
            f"{work}/codes",
            fingerprint={"bench": os.getpid()},
            autocast=torch.bfloat16 if cuda else None,
            progress=False,
        )
        if hasattr(m, "unload"):
            m.unload()  # the adapter used for the disabled pass comes off again
        return codes

    if sweep:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if variant == "sweep":
            codes = cache(_model(args), [i for lo, hi in sets for i in (*lo, *hi)])
            train(False)
            for lam in (1e3, 1e4):
                train(True, sets[0], codes, lam)
                train(True, sets[1], codes, lam)  # the random control's latents
        else:
            for _ in range(5):
                train(False)
        if cuda:
            torch.cuda.synchronize()
        return {"wall_s": time.perf_counter() - t0}
    kind = variant.removeprefix("full_")
    codes = cache(model, [i for i in (*sets[0][0], *sets[0][1])]) if kind == "cached" else None
    train(kind != "plain", codes=codes)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0  # MiB (Linux: KiB)
    return {"step_s": statistics.median(times[args.warmup :]), "peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--model", default=None, help="an HF folder instead of a random model")
    ap.add_argument("--sae", default=None, help="a SAELens folder at one of the model's residual hooks")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--latents", type=int, default=30, help="latents held down (and as many held up)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rows", type=int, default=64, help="sweep: training rows")
    ap.add_argument("--epochs", type=int, default=3, help="sweep: epochs per run")
    add_child_options(
        ap, repeats=3, choices=[*STEP_VARIANTS, *(f"full_{v}" for v in STEP_VARIANTS), "sweep", "sweep_plain"]
    )
    ap.add_argument(
        "--lora-layers",
        choices=["all", "sae"],
        default="all",
        help="rank-1 adapters on every block's down_proj, or on the SAE's block only (a narrow "
        "ModelOrganismsForEM-style adapter: the base pass then starts at that block)",
    )
    ap.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also full BLOCK-EM fine-tunes against a plain full one",
    )
    ap.add_argument(
        "--sweep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also a whole LoRA sweep (plain + 2 lambdas + their random controls) against 5 plain runs",
    )
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = ap.parse_args()
    if run_as_child(args, one_run):
        return
    variants = [*STEP_VARIANTS, *([f"full_{v}" for v in STEP_VARIANTS] if args.full else [])]
    res = run_children(__file__, sys.argv[1:], {v: v for v in variants}, args.repeats)
    med = medians(res, ("step_s", "peak_mib"))
    where = "every block's down_proj" if args.lora_layers == "all" else "the SAE block's down_proj"
    print(
        f"model {args.model or args.shape} on {args.device}, batch {args.batch} x {args.seq} tokens, rank-1 LoRA on "
        f"{where}{' (and full fine-tunes)' if args.full else ''}, {2 * args.latents} latents of a "
        f"{args.d_sae if not args.sae else 'given'}-latent SAE; memory: "
        f"{'peak allocated' if args.device.startswith('cuda') else 'peak RSS above the pre-model RSS'}"
    )
    for k in variants:
        runs = ", ".join(f"{1000 * r['step_s']:.1f}" for r in res[k])
        print(
            f"{k:14s} {1000 * med[k]['step_s']:8.1f} ms/step   peak {med[k]['peak_mib']:8.0f} MiB   (runs: {runs} ms)"
        )
    sweep = None
    if args.sweep:
        sw = run_children(
            __file__, sys.argv[1:], {"sweep": "sweep", "sweep_plain": "sweep_plain"}, args.repeats
        )
        sweep = medians(sw, ("wall_s",))
        for k in ("sweep", "sweep_plain"):
            runs = ", ".join(f"{r['wall_s']:.1f}" for r in sw[k])
            print(
                f"{k:14s} {sweep[k]['wall_s']:8.1f} s (5 runs x {args.epochs} epochs x {args.rows} rows; runs: {runs} s)"
            )
    for prefix, tag in [("", ""), *([("full_", "full_")] if args.full else [])]:
        plain = med[f"{prefix}plain"]
        for kind, name in (("blocked", ""), ("cached", "cached_")):
            print(f"{tag}{name}overhead_ratio: {med[prefix + kind]['step_s'] / plain['step_s']:.3f}")
            print(f"{tag}{name}memory_ratio: {med[prefix + kind]['peak_mib'] / plain['peak_mib']:.3f}")
    if sweep is not None:
        print(f"sweep_ratio: {sweep['sweep']['wall_s'] / sweep['sweep_plain']['wall_s']:.3f}")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
