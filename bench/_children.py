"""One measurement per process, for the benches that compare peak memory (``ru_maxrss`` only grows
within a process): each variant runs as ``python SCRIPT ARGS --_child VALUE`` and prints its result
as the last line of JSON; the variants are interleaved over the repeats so drift hits them alike."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def add_child_options(ap: argparse.ArgumentParser, repeats: int, child_type=str, **child_kw) -> None:
    """``--repeats``, ``--threads`` and the hidden ``--_child VALUE`` that ``run_children`` passes."""
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--_child", type=child_type, default=None, help=argparse.SUPPRESS, **child_kw)


def run_as_child(args: argparse.Namespace, one_run) -> bool:
    """In a child (``--_child`` given): print ``one_run(args, args._child)`` as the JSON line
    ``run_children`` reads and return True; in the parent, False."""
    if args._child is None:
        return False
    print(json.dumps(one_run(args, args._child)))
    return True


def run_children(
    script: str, argv: list[str], variants: dict[str, str], repeats: int
) -> dict[str, list[dict]]:
    """``{variant: [result per repeat]}``; a child that fails ends the bench with its stderr."""
    res: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, value in variants.items():
            p = subprocess.run(
                [sys.executable, script, *argv, "--_child", value],
                capture_output=True,
                text=True,
                check=False,
            )
            if p.returncode:
                sys.exit(p.stderr[-2000:])
            res[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
    return res


def medians(res: dict[str, list[dict]], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The median over repeats of each key, per variant."""
    return {name: {k: statistics.median(r[k] for r in runs) for k in keys} for name, runs in res.items()}
