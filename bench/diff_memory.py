"""Peak memory of the streaming model diff at N and 4N response tokens, and its throughput against
plain forward passes of the same two models over the same tokens.

    python bench/diff_memory.py                      # d_model 896, 4 layers, a 16384-latent TopK SAE
    python bench/diff_memory.py --tokens 4096 --repeats 3
    python bench/diff_memory.py --device cuda --layers 24 --vocab 151936 --tokens 25000   # 0.5B-shaped, bf16

``saediff.methods.diff_stream.stream_diff`` (what ``run_diff`` runs) reads every block's output of a base
and a fine-tuned model at the response tokens and keeps running sums (per block: base, fine-tuned,
misaligned, aligned) and the SAE's per-latent statistics, top activations and histograms, so its
memory should not grow with the number of tokens. Each measurement is its own process (peak RSS,
``ru_maxrss``; on a GPU ``torch.cuda.max_memory_allocated``, the models in bfloat16); N and 4N runs
are interleaved. The baseline for throughput is the two models'
plain forwards (no hooks, no SAE) over the same batches, in the same process. Last lines:
``forward_ratio: X`` (diff tokens/s over plain-forward tokens/s; target >= 0.7) and
``memory_growth: Y`` (peak memory at 4N / at N; target <= 1.2).
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


def one_run(args, n_tokens: int) -> dict:
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from saediff.activations.collect import TokenizedPrompts
    from saediff.methods.diff_stream import stream_diff
    from saediff.models.loading import LoadedModel, ModelSpec

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        num_hidden_layers=args.layers,
        intermediate_size=args.d_mlp,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    base = Qwen2ForCausalLM(cfg).eval()
    ft = Qwen2ForCausalLM(cfg).eval()
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base, ft = base.to(args.device, dtype), ft.to(args.device, dtype)
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=args.d_model,
            d_sae=args.d_sae,
            k=64,
            metadata=SAEMetadata(hook_name=f"blocks.{args.layers // 2}.hook_resid_post"),
        )
    ).to(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # from here: the diff's own memory on top of the two models
    prompt, answer = 32, 96
    n_seq = n_tokens // answer
    g = torch.Generator().manual_seed(1)
    toks = TokenizedPrompts(
        torch.randint(3, args.vocab, (n_seq, prompt + answer), generator=g),
        torch.cat(
            [torch.zeros(n_seq, prompt, dtype=torch.long), torch.ones(n_seq, answer, dtype=torch.long)], 1
        ),
    )
    lm_b, lm_f = (LoadedModel(m, None, ModelSpec("random")) for m in (base, ft))
    labels = [bool(i % 2) for i in range(n_seq)]

    def plain() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n_seq, args.batch):
                for m in (base, ft):
                    m(input_ids=toks.input_ids[i : i + args.batch].to(args.device))
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    t_plain = plain()
    t = time.perf_counter()
    stream_diff(lm_b, lm_f, toks, sae, labels, batch_size=args.batch, progress=False)
    if cuda:
        torch.cuda.synchronize()
    t_diff = time.perf_counter() - t
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "tokens": n_seq * answer,
        "diff_tok_s": n_seq * answer / t_diff,
        "plain_tok_s": n_seq * answer / t_plain,
        "peak_mib": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tokens", type=int, default=2048, help="N: response tokens of the small run (the large: 4N)"
    )
    ap.add_argument("--d-model", type=int, default=896)
    ap.add_argument("--d-mlp", type=int, default=4864)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    add_child_options(ap, repeats=2, child_type=int)
    args = ap.parse_args()
    if run_as_child(args, one_run):
        return
    res = run_children(
        __file__, sys.argv[1:], {str(n): str(n) for n in (args.tokens, 4 * args.tokens)}, args.repeats
    )
    med = {int(n): m for n, m in medians(res, ("diff_tok_s", "plain_tok_s", "peak_mib")).items()}
    print(
        f"Qwen2-shaped d_model {args.d_model}, {args.layers} layers, TopK SAE {args.d_sae} latents, batch {args.batch}"
    )
    for n, m in med.items():
        print(
            f"{n:7d} response tokens: diff {m['diff_tok_s']:7.0f} tok/s, two plain forwards {m['plain_tok_s']:7.0f} "
            f"tok/s, peak {m['peak_mib']:6.0f} MiB"
        )
    big = med[4 * args.tokens]
    print(f"forward_ratio: {big['diff_tok_s'] / big['plain_tok_s']:.3f}")
    print(f"memory_growth: {big['peak_mib'] / med[args.tokens]['peak_mib']:.3f}")


if __name__ == "__main__":
    main()
