"""Judged responses per second: concurrent HTTP judge calls vs sequential ones, same fake server.

    python bench/judge_throughput.py [--n 200] [--delay 0.02] [--concurrency 16] [--repeats 3]

The fake OpenAI-compatible server on 127.0.0.1 adds ``--delay`` seconds per request (a stand-in
for a judge model's latency). Runs are interleaved; the last line is the median ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")

from saediff.evaluation.fake_server import FakeOpenAIServer
from saediff.evaluation.judges import HttpJudge
from saediff.evaluation.openai_api import ChatClient


def run(server, n: int, concurrency: int, tag: str) -> float:
    judge = HttpJudge("aligned", ChatClient(server.url), "fake-judge", concurrency=concurrency)
    items = [(f"question {tag} {i}", f"answer {i}") for i in range(n)]
    t0 = time.perf_counter()
    scores = judge.score(items, progress=False)
    dt = time.perf_counter() - t0
    assert all(s.score is not None for s in scores)
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--delay", type=float, default=0.02)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    seq, conc = [], []
    with FakeOpenAIServer(delay_s=args.delay) as server:
        for r in range(args.repeats):
            seq.append(run(server, args.n, 1, f"s{r}"))
            conc.append(run(server, args.n, args.concurrency, f"c{r}"))
    s, c = statistics.median(seq), statistics.median(conc)
    print(
        f"sequential: {s:.1f} judged/s   concurrent ({args.concurrency}): {c:.1f} judged/s   "
        f"(n={args.n}, delay={args.delay}s, median of {args.repeats})"
    )
    print(f"speedup_vs_sequential: {c / s:.2f}")


if __name__ == "__main__":
    main()
