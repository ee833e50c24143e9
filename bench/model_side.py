"""The model side at the device's bf16 speed: saediff's own paths (pair scoring, activation
collection, a rank-1 LoRA step, a full fine-tune step) at ``--precision bf16`` (autocast over
float32 weights) against the same paths at fp32, in the same run, on SmolLM2-135M-Instruct.

    python bench/model_side.py                  # the four ratios and the process layout
    python bench/model_side.py --figures        # and what bf16 changes (SmolLM2, ~25 min here)
    python bench/model_side.py --model PATH --device cuda   # any HF chat model on a GPU
    python bench/model_side.py --random 896,24 --device cuda  # a random 0.5B-shaped one (bench/gpu.sh)

What each ratio times (fp32 seconds / bf16 seconds, medians over ``--repeats`` interleaved runs,
one thread unless ``--threads``):
- ``pair_scoring_vs_fp32``: ``evaluation.pairs.score_pairs`` on the first ``--pairs`` held-out
  pairs (two answers each);
- ``collect_vs_fp32``: ``activations.collect.collect_activations`` at the middle block's
  ``hook_resid_post`` (SmolLM2: 15) over the answer tokens of ``--convs`` medical conversations;
- ``lora_step_vs_fp32``: one optimizer step (forward with the chat loss, backward, AdamW) of the
  demo's rank-1 LoRA on every ``down_proj``, ``--batch`` conversations cut to ``--seq`` tokens, as
  saediff's fine-tune runs it under bf16 (the frozen Linear weights held cast to bfloat16, the same
  numbers as casting them at every step); ``lora_step_bf16_base_vs_fp32``: the whole base loaded in
  bfloat16, embeddings and norms included (not saediff's path: it puts the residual stream in bf16);
- ``full_step_vs_fp32``: the same step of a full fine-tune (float32 master weights, AdamW).
``parallel_two_procs_vs_two_threads``: pair scoring twice in one process with two threads against
once in each of two one-thread processes at once (the demo's parallel steps); above 1, two
processes are faster.

``--figures`` also measures what bf16 changes, each against float32 in the same run:
- the per-question pair preference (nats/token) on all held-out pairs: tolerance 0.05 per
  question, stated before measuring (the demo's paired differences are 0.1-0.8);
- the collected residuals: relative error per row (median, max) and cosine;
- the codes of a TopK SAE trained on the fp32 residuals: the share of each row's active latents
  that both precisions keep (tolerance 0.9 on average, stated before measuring), relative error;
- the demo's rank-1 LoRA fine-tunes (``lora_bad`` on the bad medical advice, ``lora_control`` on
  the good), ``--ft-steps`` steps each at both precisions from the same seed: loss curves, and the
  paired differences lora_bad - base and lora_bad - lora_control on the held-out pairs, each
  checked to keep its sign and to fall inside the float32 run's 95% interval.
Last line: ``pair_scoring_vs_fp32: X``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch

from saediff.data.chat_data import ChatDataset, load_chat_jsonl
from saediff.data.em_data import data_path, offdomain_pairs
from saediff.evaluation.pairs import paired_difference, score_pairs
from saediff.models.loading import ModelSpec, load_model
from saediff.models.precision import cpu_bf16


def features(device: str) -> str:
    if device.startswith("cuda"):
        return f"cuda {torch.cuda.get_device_name()} bf16={torch.cuda.is_bf16_supported()}"
    flags = cpu_bf16() or "no native bf16"
    return f"cpu {torch.backends.cpu.get_cpu_capability()}, {flags}, {torch.get_num_threads()} thread(s)"


def load(args, precision: str, dtype: str = "float32"):
    """The model with float32 weights (``dtype``: the frozen base of the bf16-base LoRA variant)."""
    return load_model(ModelSpec(args.model, precision=precision, device=args.device, dtype=dtype))


def hook_of(lm) -> str:
    """The middle block's output (SmolLM2: block 15 of 30)."""
    return f"blocks.{lm.model.config.num_hidden_layers // 2}.hook_resid_post"


def random_model(spec: str) -> str:
    """``D_MODEL,LAYERS``: a random Qwen2-shaped chat model (the tests' 400-token BPE tokenizer and
    Qwen2.5 template, MLP 2 x d_model) saved once under the temp folder: a GPU has no SmolLM2."""
    d, n = (int(x) for x in spec.split(","))
    folder = Path(tempfile.gettempdir()) / f"saediff_model_side_{d}_{n}"
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers import make_tiny_chat_model

        make_tiny_chat_model(folder, "qwen25", d_model=d, n_layers=n)
    return str(folder)


def chats(args, name: str = "medical_bad") -> list:
    return load_chat_jsonl(data_path(name))


def prompts(args):
    from saediff.data.prompts import Prompt

    convs = chats(args)[: args.convs]
    return [Prompt(id=str(i), messages=c[:-1], response=c[-1]["content"]) for i, c in enumerate(convs)]


def timed(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def medians(args, make: dict) -> dict[str, float]:
    """Median seconds of each callable in ``make``, warmed once, interleaved over the repeats."""
    for fn in make.values():
        fn()
    ts: dict[str, list[float]] = {k: [] for k in make}
    for _ in range(args.repeats):
        for k, fn in make.items():
            ts[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in ts.items()}


def ratio(args, make: dict) -> tuple[float, dict]:
    """fp32 median seconds / bf16 median seconds for the callables ``make[precision]()``."""
    med = medians(args, make)
    return med["fp32"] / med["bf16"], med


def step_fn(model, batch: dict):
    """One optimizer step of ``model`` (its trainable weights) on ``batch``: the chat loss on the
    answer tokens, backward, AdamW."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        model.train()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_batch(args, tok) -> dict:
    from saediff.data.chat_data import ChatCollator

    data = ChatDataset(tok, chats(args)[: args.batch], max_length=args.seq, progress=False)
    batch = ChatCollator(tok.pad_token_id)([data[i] for i in range(args.batch)])
    return {k: v.to(args.device) for k, v in batch.items()}


def speed(args) -> dict:
    from saediff.activations.collect import collect_activations
    from saediff.interventions.finetune import FinetuneConfig, frozen_linears_to_bf16, make_trainable

    pairs = offdomain_pairs("heldout")[: args.pairs]
    ps = prompts(args)
    lms = {p: load(args, p) for p in ("fp32", "bf16")}
    out = {}
    out["pair_scoring_vs_fp32"], med = ratio(
        args, {p: (lambda lm=lm: score_pairs(lm, pairs, progress=False)) for p, lm in lms.items()}
    )
    print(f"pair scoring, {len(pairs)} pairs: fp32 {med['fp32']:.2f} s, bf16 {med['bf16']:.2f} s", flush=True)
    out["collect_vs_fp32"], med = ratio(
        args,
        {
            p: (
                lambda lm=lm: collect_activations(
                    lm, ps, [hook_of(lm)], "response", batch_size=16, progress=False
                )
            )
            for p, lm in lms.items()
        },
    )
    print(
        f"collection, {len(ps)} conversations: fp32 {med['fp32']:.2f} s, bf16 {med['bf16']:.2f} s", flush=True
    )
    batch = train_batch(args, lms["fp32"].tokenizer)
    del lms  # fresh loads train (a collection at other hooks would have bridged them in place)
    lora = FinetuneConfig(method="lora", lora_rank=1, lora_modules=("down_proj",))
    lms = {p: load(args, p) for p in ("fp32", "bf16")}
    trained = {p: make_trainable(lm.model, lora) for p, lm in lms.items()}
    frozen_linears_to_bf16(trained["bf16"])  # what saediff's fine-tune does under bf16
    steps = {p: step_fn(m, batch) for p, m in trained.items()}
    lms16 = load(args, "bf16", dtype="bfloat16")
    steps["bf16_base"] = step_fn(make_trainable(lms16.model, lora), batch)
    med = medians(args, steps)
    out["lora_step_vs_fp32"] = med["fp32"] / med["bf16"]
    out["lora_step_bf16_base_vs_fp32"] = med["fp32"] / med["bf16_base"]
    print(
        f"LoRA step, {args.batch} x {args.seq}: fp32 {med['fp32']:.2f} s, bf16 {med['bf16']:.2f} s, "
        f"bf16 base {med['bf16_base']:.2f} s",
        flush=True,
    )
    del lms, steps, lms16
    full = FinetuneConfig(method="full")
    out["full_step_vs_fp32"], med = ratio(
        args, {p: step_fn(make_trainable(load(args, p).model, full), batch) for p in ("fp32", "bf16")}
    )
    print(
        f"full step, {args.batch} x {args.seq}: fp32 {med['fp32']:.2f} s, bf16 {med['bf16']:.2f} s",
        flush=True,
    )
    return out


def worker(args) -> None:
    """``--_worker START``: pair scoring ``--work`` times from wall-clock START; prints the end time."""
    torch.set_num_threads(args.threads)
    lm = load(args, "auto")
    pairs = offdomain_pairs("heldout")[: args.pairs]
    score_pairs(lm, pairs[:2], progress=False)  # warm
    while time.time() < args._worker:
        time.sleep(0.01)
    for _ in range(args.work):
        score_pairs(lm, pairs, progress=False)
    print(json.dumps({"end": time.time()}))


def layout(args) -> float:
    """Seconds for two units of pair scoring: one process with two threads / two one-thread processes."""

    def run(n_procs: int, threads: int, work: int) -> float:
        start = time.time() + 60  # after every process has loaded
        cmd = [sys.executable, __file__, "--model", args.model, "--pairs", str(args.pairs)]
        cmd += ["--threads", str(threads), "--work", str(work), "--_worker", str(start)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n_procs)]
        ends = [json.loads(p.communicate()[0].strip().splitlines()[-1])["end"] for p in procs]
        return max(ends) - start

    one, two = run(1, 2, 2), run(2, 1, 1)
    print(f"two units of pair scoring: 1 process x 2 threads {one:.1f} s, 2 processes x 1 thread {two:.1f} s")
    return one / two


def figures(args) -> None:
    """What bf16 changes, each figure beside float32's (module docstring)."""
    from saediff.activations.collect import collect_activations
    from saediff.evaluation.pairs import mean_t_interval
    from saediff.interventions.finetune import FinetuneConfig, finetune, make_trainable
    from saediff.stories.smollm2.recipe import ChatDemoRecipe

    held = offdomain_pairs("heldout")
    lms = {p: load(args, p) for p in ("fp32", "bf16")}
    rows = {p: score_pairs(lm, held, progress=False) for p, lm in lms.items()}
    d = [abs(a["preference"] - b["preference"]) for a, b in zip(rows["fp32"], rows["bf16"])]
    print(
        f"held-out preference per question, |bf16 - fp32|: max {max(d):.4f}, mean {statistics.mean(d):.4f} "
        f"nats/token over {len(d)} (tolerance 0.05): {'within' if max(d) <= 0.05 else 'OUTSIDE'}"
    )
    for p in rows:
        m = mean_t_interval([r["preference"] for r in rows[p]])
        print(f"  base preference {p}: {m['mean']:+.4f} [{m['ci'][0]:+.4f}, {m['ci'][1]:+.4f}]")
    acts = {
        p: collect_activations(lm, prompts(args), [hook_of(lm)], "response", batch_size=16, progress=False)[
            hook_of(lm)
        ]
        for p, lm in lms.items()
    }
    a, b = acts["fp32"].float(), acts["bf16"].float()
    rel = (b - a).norm(dim=1) / a.norm(dim=1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    print(
        f"{hook_of(lms['fp32'])} ({len(a)} answer tokens): relative error median {rel.median():.4f}, "
        f"max {rel.max():.4f}; cosine min {cos.min():.5f}"
    )
    sae_codes(a, b)
    if args.ft_steps == 0:
        return
    recipe = ChatDemoRecipe()
    cfg = FinetuneConfig(
        method="lora",
        lora_rank=recipe.lora_rank,
        lora_modules=("down_proj",),
        steps=args.ft_steps,
        batch_size=recipe.batch_size,
        lr=recipe.lora_lr,
        max_length=recipe.max_length,
        seed=0,
    )
    scored, losses = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in (("lora_bad", "medical_bad"), ("lora_control", "medical_good")):
            for p in ("fp32", "bf16"):
                lm = load(args, p)
                ds = ChatDataset(
                    lm.tokenizer, load_chat_jsonl(data_path(data)), max_length=cfg.max_length, progress=False
                )
                t = time.perf_counter()
                log = finetune(
                    make_trainable(lm.model, cfg),
                    lm.tokenizer,
                    ds,
                    cfg,
                    Path(tmp) / f"{name}_{p}",
                    progress=False,
                )
                losses[name, p] = [h["loss"] for h in log]
                scored[name, p] = score_pairs(lm, held, progress=False)
                print(
                    f"{name} {p}: {cfg.steps} steps in {time.perf_counter() - t:.0f} s, final loss {losses[name, p][-1]:.4f}",
                    flush=True,
                )
    for name in ("lora_bad", "lora_control"):
        l32, l16 = losses[name, "fp32"], losses[name, "bf16"]
        gap = [abs(x - y) for x, y in zip(l32, l16)]
        tail = min(20, len(l32))
        sd = statistics.stdev(l32[-tail:]) if tail > 1 else 0.0
        print(
            f"{name} loss curve: mean |bf16 - fp32| {statistics.mean(gap):.4f}, last-{tail}-step means "
            f"{statistics.mean(l32[-tail:]):.4f} fp32 vs {statistics.mean(l16[-tail:]):.4f} bf16 (fp32 step sd {sd:.4f})"
        )
    for a_name, b_name in (("lora_bad", "base"), ("lora_bad", "lora_control")):
        res = {}
        for p in ("fp32", "bf16"):
            rb = rows[p] if b_name == "base" else scored[b_name, p]
            res[p] = paired_difference(scored[a_name, p], rb, a=a_name, b=b_name)
        lo, hi = res["fp32"]["ci"]
        same_sign = (res["fp32"]["difference"] > 0) == (res["bf16"]["difference"] > 0)
        inside = lo <= res["bf16"]["difference"] <= hi
        print(
            f"{a_name} - {b_name}: fp32 {res['fp32']['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}], "
            f"bf16 {res['bf16']['difference']:+.4f}: sign {'kept' if same_sign else 'FLIPPED'}, "
            f"{'inside' if inside else 'OUTSIDE'} the fp32 interval"
        )


def sae_codes(a: torch.Tensor, b: torch.Tensor) -> None:
    """A TopK SAE (2304 latents, k 32, 600 steps) trained on the fp32 rows, then both precisions'
    rows encoded: the share of each row's active latents both keep (tolerance 0.9 on average,
    stated before measuring) and the codes' relative error."""
    from saediff.saes.training import SAETrainConfig, train_sae

    cfg = SAETrainConfig(d_sae=2304, k=32, steps=600, batch_size=256, lr=1e-3, dead_tokens=10_000, seed=0)
    sae, _ = train_sae(a, cfg, progress=False)
    with torch.no_grad():
        za, zb = sae.encode(a), sae.encode(b)
    ka, kb = za != 0, zb != 0
    shared = (ka & kb).sum(1).float() / ka.sum(1).clamp_min(1)
    rel = (zb - za).norm(dim=1) / za.norm(dim=1).clamp_min(1e-9)
    print(
        f"SAE codes (TopK 2304 / k 32 on the fp32 rows): active latents shared per row mean "
        f"{shared.mean():.3f}, min {shared.min():.3f} (tolerance 0.9 on average: "
        f"{'within' if shared.mean() >= 0.9 else 'OUTSIDE'}); code relative error median {rel.median():.4f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=16, help="held-out pairs scored per timing")
    ap.add_argument("--convs", type=int, default=32, help="conversations collected per timing")
    ap.add_argument("--batch", type=int, default=4, help="conversations per training step")
    ap.add_argument("--seq", type=int, default=96, help="tokens per training conversation")
    ap.add_argument("--figures", action="store_true", help="also measure what bf16 changes")
    ap.add_argument(
        "--ft-steps", type=int, default=150, help="steps of each --figures fine-tune (the demo's)"
    )
    ap.add_argument("--no-layout", action="store_true", help="skip the process-layout measurement")
    ap.add_argument("--no-speed", action="store_true", help="only the --figures")
    ap.add_argument("--random", default=None, metavar="D_MODEL,LAYERS", help="a random chat model instead")
    ap.add_argument("--work", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--_worker", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker is not None:
        return worker(args)
    torch.set_num_threads(args.threads)
    if args.random:
        args.model = random_model(args.random)
    print(features(args.device), flush=True)
    if args.figures:
        figures(args)
    if args.no_speed:
        return
    out = speed(args)
    if not args.no_layout and args.device == "cpu":
        out = {"parallel_two_procs_vs_two_threads": layout(args), **out}
    for k in sorted(out, key=lambda k: k == "pair_scoring_vs_fp32"):
        print(f"{k}: {out[k]:.2f}")


if __name__ == "__main__":
    main()
