"""Step time and peak memory of a LoRA BLOCK-EM fine-tune against a plain LoRA fine-tune of the
same model, and of a full BLOCK-EM fine-tune against a plain full one, all through saediff's
Trainer path (``saediff.finetune.finetune``).

    python bench/blocking_overhead.py                       # CPU: a random Qwen2-shaped model (d 256, 4 layers)
    python bench/blocking_overhead.py --shape 0.5b --seq 256 --batch 8 --steps 30    # GPU: Qwen2.5-0.5B-shaped, bf16
    python bench/blocking_overhead.py --model path/to/hf_folder --sae path/to/sae
    python bench/blocking_overhead.py --lora-layers sae     # a narrow adapter on the SAE's block only
    python bench/blocking_overhead.py --no-full             # the LoRA pair only

BLOCK-EM reads the base model's codes from the same weights with the adapter disabled, stopping
the forward at the SAE's block, so there is no second copy of the model: the extra cost per step
is a partial forward (from the first adapted block to the SAE's: blocks before it agree in both
passes) plus an SAE encode of the chosen latents. With adapters on every block and the SAE in
the middle, that partial forward is about half a forward, which bounds the overhead from below.
A full fine-tune cannot disable its update, so its base codes come from a frozen reference: the
model's embedding and blocks up to the SAE's, copied once (``saediff.blockem._reference``), in
float32 like the trained weights (float32 masters under bf16 autocast on a GPU). Its memory
cost is that partial copy against weights + gradients + AdamW state of the whole model.

Each run is its own process (peak memory is per process: ``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on GPU); runs are interleaved (plain, blocked, plain, ...)
and the medians of the per-step times after a warm-up are compared. The ratio lines come last:
``overhead_ratio: X`` (LoRA blocked / plain step time; target <= 1.15), ``memory_ratio: Y``
(LoRA blocked / plain peak memory; target <= 1.3), then, unless ``--no-full``,
``full_overhead_ratio`` and ``full_memory_ratio`` (full blocked / full plain).
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
        from saediff.models import ModelSpec, load_model

        return load_model(ModelSpec(args.model, device=args.device)).model
    d, n, m, h, kv, v = SHAPES[args.shape]
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=v, hidden_size=d, num_hidden_layers=n, intermediate_size=m, num_attention_heads=h,
                      num_key_value_heads=kv, max_position_embeddings=4096, tie_word_embeddings=True)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return Qwen2ForCausalLM(cfg).to(args.device, dtype)


def _sae(args, d_model: int, layer: int):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    if args.sae:
        from saediff.saes import load_sae

        return load_sae(args.sae)
    return TopKSAE(TopKSAEConfig(d_in=d_model, d_sae=args.d_sae, k=32,
                                 metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")))


class _Tok:  # what finetune() needs of a tokenizer for pre-tokenized data
    pad_token_id, eos_token_id = 0, 0


def one_run(args, blocked: bool, method: str = "lora") -> dict:
    """Train ``args.steps`` steps in this process; per-step times and peak memory."""
    import torch
    from transformers import TrainerCallback

    from saediff.blockem import _reference
    from saediff.blocking import BlockConfig, Blocker
    from saediff.finetune import FinetuneConfig, finetune, make_trainable
    from saediff.hooks import decoder_layers
    from saediff.saes import check_sae_fits

    torch.set_num_threads(args.threads)
    model = _model(args)
    n_layers = len(decoder_layers(model))
    layer = n_layers // 2
    sae = _sae(args, model.config.hidden_size, layer)
    layer = check_sae_fits(sae, model, "bench")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (args.steps * args.batch, args.seq), generator=g)
    half = args.seq // 2
    data = [{"input_ids": r.tolist(), "labels": [-100] * half + r[half:].tolist()} for r in ids]
    lora_layers = None if args.lora_layers == "all" else (layer,)
    ft = FinetuneConfig(method=method, lora_rank=1, lora_modules=("down_proj",), lora_layers=lora_layers, steps=args.steps,
                        batch_size=args.batch, lr=1e-4 if method == "lora" else 1e-5,
                        precision="bf16" if args.device.startswith("cuda") else "fp32")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()  # from here: float32 masters, reference, training
    model = make_trainable(model, ft)
    times: list[float] = []

    class _Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    out = f"/tmp/saediff_bench_block_{os.getpid()}"
    if blocked:
        n = args.latents
        ref = _reference(model, layer) if method == "full" else None
        blocker = Blocker(BlockConfig("penalty", layer, tuple(range(n)), tuple(range(n, 2 * n)), 1e4), sae=sae,
                          reference=ref)
        with blocker.installed(model):
            finetune(model, _Tok(), data, ft, out, extra=blocker, callbacks=[_Clock()], progress=False)
    else:
        finetune(model, _Tok(), data, ft, out, callbacks=[_Clock()], progress=False)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    return {"step_s": statistics.median(times[args.warmup:]), "peak_mib": peak}


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
    add_child_options(ap, repeats=3, choices=["plain", "blocked", "full_plain", "full_blocked"])
    ap.add_argument("--lora-layers", choices=["all", "sae"], default="all",
                    help="rank-1 adapters on every block's down_proj, or on the SAE's block only (a narrow "
                         "ModelOrganismsForEM-style adapter: the base pass then starts at that block)")
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                    help="also a full BLOCK-EM fine-tune against a plain full one")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = ap.parse_args()
    if run_as_child(args, lambda a, v: one_run(a, v.endswith("blocked"), "full" if v.startswith("full") else "lora")):
        return
    variants = ["plain", "blocked"] + (["full_plain", "full_blocked"] if args.full else [])
    res = run_children(__file__, sys.argv[1:], {v: v for v in variants}, args.repeats)
    med = medians(res, ("step_s", "peak_mib"))
    where = "every block's down_proj" if args.lora_layers == "all" else "the SAE block's down_proj"
    print(f"model {args.model or args.shape} on {args.device}, batch {args.batch} x {args.seq} tokens, rank-1 LoRA on "
          f"{where}{' (and a full fine-tune)' if args.full else ''}, {2 * args.latents} latents of a "
          f"{args.d_sae if not args.sae else 'given'}-latent SAE")
    for k in variants:
        runs = ", ".join(f"{1000 * r['step_s']:.1f}" for r in res[k])
        print(f"{k:12s} {1000 * med[k]['step_s']:8.1f} ms/step   peak {med[k]['peak_mib']:8.0f} MiB   (runs: {runs} ms)")
    print(f"overhead_ratio: {med['blocked']['step_s'] / med['plain']['step_s']:.3f}")
    print(f"memory_ratio: {med['blocked']['peak_mib'] / med['plain']['peak_mib']:.3f}")
    if args.full:
        print(f"full_overhead_ratio: {med['full_blocked']['step_s'] / med['full_plain']['step_s']:.3f}")
        print(f"full_memory_ratio: {med['full_blocked']['peak_mib'] / med['full_plain']['peak_mib']:.3f}")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
