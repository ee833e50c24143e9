"""Judged responses per second: concurrent HTTP judge calls vs sequential ones, same server.

    python bench/judge_throughput.py [--n 200] [--delay 0.02] [--concurrency 16] [--repeats 3]
    python bench/judge_throughput.py --vllm [--vllm-python PATH] [--n 48]   # real vLLM, SmolLM2 judging
    python bench/judge_throughput.py --tiny [--vllm]                        # the slow suite's size

By default the judge is a fake OpenAI-compatible server on 127.0.0.1 that adds ``--delay``
seconds per request (a stand-in for a judge model's latency). With ``--vllm`` it is vLLM's CPU
build serving SmolLM2-135M-Instruct (``--vllm-python`` or ``$SAEDIFF_VLLM_PYTHON`` is the
interpreter of vLLM's environment); SmolLM2 is a poor judge, so replies it gives no score for
still count: the bench times requests, not scores. With vLLM, one unmeasured concurrent round
warms the server up first. Runs are interleaved; the last line is the median ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

from saediff.errors import SaediffError
from saediff.evaluation.fake_server import FakeOpenAIServer
from saediff.evaluation.judges import HttpJudge
from saediff.evaluation.openai_api import ChatClient
from saediff.evaluation.vllm_server import VllmServer


def run(client: ChatClient, model: str, n: int, concurrency: int, tag: str, all_scored: bool) -> float:
    """Judged responses per second for ``n`` fresh items (``tag`` keeps them out of any cache)."""
    judge = HttpJudge("aligned", client, model, concurrency=concurrency)
    items = [(f"question {tag} {i}", f"answer {i}") for i in range(n)]
    t0 = time.perf_counter()
    scores = judge.score(items, progress=False)
    dt = time.perf_counter() - t0
    assert len(scores) == n
    assert not all_scored or all(s.score is not None for s in scores)
    return n / dt


def smollm2_server(python: str) -> VllmServer:
    """vLLM serving SmolLM2-135M-Instruct as ``base`` (its HF folder, built from the GGUF once)."""
    from saediff.models.gguf import gguf_source, materialize

    return VllmServer(python, materialize(gguf_source("smollm2-135m")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="items per run (default 200; 48 with --vllm)")
    ap.add_argument("--delay", type=float, default=0.02, help="fake server's seconds per request")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--vllm", action="store_true", help="judge with vLLM serving SmolLM2, not the fake server"
    )
    ap.add_argument("--vllm-python", default=os.environ.get("SAEDIFF_VLLM_PYTHON"))
    ap.add_argument("--tiny", action="store_true", help="16 items, one repeat (the slow suite)")
    args = ap.parse_args()
    args.n = args.n or (48 if args.vllm else 200)  # a CPU vLLM judges about one item a second
    if args.tiny:
        args.n, args.repeats = 16, 1
    if args.vllm and not args.vllm_python:
        sys.exit("judge_throughput: --vllm needs --vllm-python or $SAEDIFF_VLLM_PYTHON (vLLM's interpreter)")
    server = smollm2_server(args.vllm_python) if args.vllm else FakeOpenAIServer(delay_s=args.delay)
    seq, conc = [], []
    try:
        with server:
            if args.vllm:
                client, model = ChatClient(server.url, api_key_env=None), server.served_name
                run(client, model, args.concurrency, args.concurrency, "warmup", False)
            else:
                client, model = ChatClient(server.url), "fake-judge"
            for r in range(args.repeats):
                seq.append(run(client, model, args.n, 1, f"s{r}", not args.vllm))
                conc.append(run(client, model, args.n, args.concurrency, f"c{r}", not args.vllm))
    except SaediffError as e:
        sys.exit(f"judge_throughput: {e}")
    s, c = statistics.median(seq), statistics.median(conc)
    where = "vLLM CPU, SmolLM2-135M" if args.vllm else f"delay={args.delay}s"
    print(
        f"sequential: {s:.1f} judged/s   concurrent ({args.concurrency}): {c:.1f} judged/s   "
        f"(n={args.n}, {where}, median of {args.repeats})"
    )
    print(f"speedup_vs_sequential: {c / s:.2f}")


if __name__ == "__main__":
    main()
