"""Generated tokens per second: RemoteGenerator at concurrency N vs 1, one vLLM server (SmolLM2).

    python bench/gen_throughput.py [--vllm-python PATH] [--n 32] [--max-new-tokens 64] [--concurrency 16] [--repeats 3]
    python bench/gen_throughput.py --tiny     # 8 answers of at most 16 tokens, one repeat (the slow suite)

vLLM's CPU build serves SmolLM2-135M-Instruct (``--vllm-python`` or ``$SAEDIFF_VLLM_PYTHON`` is the
interpreter of vLLM's environment). Each arm asks ``saediff``'s ``RemoteGenerator`` for one answer
to each of ``--n`` first-plot questions (cycled) at temperature 1; only its concurrency differs.
Every run uses the same seed, so both arms sample the same answers and do the same work; tokens
are the server's ``usage.completion_tokens``. One unmeasured concurrent round warms the server up
first. Runs are interleaved; the last line is the median ratio of tokens per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("TQDM_DISABLE", "1")

from judge_throughput import smollm2_server

from saediff.data.prompts import load_prompts
from saediff.errors import SaediffError
from saediff.evaluation.evals import EMConfig, RemoteGenerator
from saediff.evaluation.openai_api import ChatClient


@dataclass(frozen=True)
class CountingClient(ChatClient):
    """A ChatClient that keeps each reply's ``usage.completion_tokens`` (threads share the list:
    ``append`` is atomic)."""

    completion_tokens: list[int] = field(default_factory=list, compare=False, repr=False)

    def chat(self, body: dict, client=None) -> dict:
        reply = super().chat(body, client)
        self.completion_tokens.append(int(reply["usage"]["completion_tokens"]))
        return reply


@dataclass(frozen=True)
class Arm:
    tokens: int
    """generated tokens, all answers together"""
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run(url: str, model: str, conversations: list, cfg: EMConfig, concurrency: int, seed: int) -> Arm:
    client = CountingClient(url, api_key_env=None)
    generate = RemoteGenerator(client, model, concurrency)
    t0 = time.perf_counter()
    answers = generate(conversations, cfg, seed)
    dt = time.perf_counter() - t0
    assert len(answers) == len(conversations) == len(client.completion_tokens)
    return Arm(sum(client.completion_tokens), dt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="answers per run")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm-python", default=os.environ.get("SAEDIFF_VLLM_PYTHON"))
    ap.add_argument("--tiny", action="store_true", help="8 answers of at most 16 tokens, one repeat")
    args = ap.parse_args()
    if args.tiny:
        args.n, args.max_new_tokens, args.repeats = 8, 16, 1
    if not args.vllm_python:
        sys.exit("gen_throughput: needs --vllm-python or $SAEDIFF_VLLM_PYTHON (vLLM's interpreter)")
    questions = [p.messages for p in load_prompts("first_plot")]
    conversations = [questions[i % len(questions)] for i in range(args.n)]
    cfg = EMConfig(samples=1, max_new_tokens=args.max_new_tokens, temperature=1.0)
    seq: list[Arm] = []
    conc: list[Arm] = []
    try:
        with smollm2_server(args.vllm_python) as server:
            url, model = server.url, server.served_name
            run(url, model, conversations[: args.concurrency], cfg, args.concurrency, seed=1)  # warm-up
            for _ in range(args.repeats):
                seq.append(run(url, model, conversations, cfg, 1, seed=0))
                conc.append(run(url, model, conversations, cfg, args.concurrency, seed=0))
    except SaediffError as e:
        sys.exit(f"gen_throughput: {e}")
    s = statistics.median(a.tokens_per_s for a in seq)
    c = statistics.median(a.tokens_per_s for a in conc)
    answers_s = statistics.median(args.n / a.seconds for a in seq)
    answers_c = statistics.median(args.n / a.seconds for a in conc)
    print(
        f"sequential: {s:.1f} tokens/s ({answers_s:.2f} answers/s)   "
        f"concurrent ({args.concurrency}): {c:.1f} tokens/s ({answers_c:.2f} answers/s)   "
        f"(n={args.n}, max_new_tokens={args.max_new_tokens}, tokens per run sequential "
        f"{[a.tokens for a in seq]} concurrent {[a.tokens for a in conc]}, vLLM CPU, SmolLM2-135M, "
        f"median of {args.repeats})"
    )
    print(f"speedup_vs_sequential: {c / s:.2f}")


if __name__ == "__main__":
    main()
