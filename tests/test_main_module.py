"""``python -m saediff`` runs the CLI (what ``torchrun -m saediff`` and ``accelerate launch -m saediff`` need)."""

from __future__ import annotations

import subprocess
import sys


def test_python_m_saediff_runs_the_cli():
    res = subprocess.run(
        [sys.executable, "-m", "saediff", "--help"], check=False, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "Usage:" in res.stdout and "diff" in res.stdout and "export" in res.stdout
