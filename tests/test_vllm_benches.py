"""The vLLM throughput benches (judge and generation, SmolLM2 on vLLM's CPU build) at tiny size:
each starts a server, runs both arms and ends on its ratio. Skipped without vLLM's interpreter."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [["judge_throughput.py", "--tiny", "--vllm"], ["gen_throughput.py", "--tiny"]],
    ids=["judge", "gen"],
)
def test_vllm_bench_runs_at_tiny_size(argv):
    if not os.environ.get("SAEDIFF_VLLM_PYTHON"):
        pytest.skip("SAEDIFF_VLLM_PYTHON is unset (the interpreter of an environment with vLLM)")
    script, *flags = argv
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    name, _, value = p.stdout.strip().splitlines()[-1].partition(": ")
    assert name == "speedup_vs_sequential", p.stdout[-2000:]
    assert math.isfinite(float(value)) and float(value) > 0, value
