"""The demo's steps as its status line and ``summary.json`` see them: timed, skipped when they did
no work, and a fine-tune's progress step by step."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

__all__ = ["StepProgress", "Steps", "counted"]


class Steps:
    """The demo's steps, timed: a step whose marker file (the artifact it writes) was not rewritten
    did no work (a finished fine-tune, a reused evaluation) and keeps its time from the earlier run."""

    def __init__(self, prev_timing: dict, say: Callable[[str], None]):
        self.prev, self.say = prev_timing, say
        self.timing: dict[str, float] = {}
        self.ran: list[str] = []

    def __call__(self, name: str, markers: list[Path], fn: Callable[[], object]):
        self.say(name)
        before = [m.stat().st_mtime_ns if m.exists() else None for m in markers]
        t0 = time.perf_counter()
        result = fn()
        worked = before != [m.stat().st_mtime_ns if m.exists() else None for m in markers]
        if worked:
            self.ran.append(name)
        self.timing[name] = (
            round(time.perf_counter() - t0, 2) if worked or name not in self.prev else self.prev[name]
        )
        return result


class StepProgress(TrainerCallback):
    """Shows a fine-tune's optimizer step on the demo's status line."""

    def __init__(self, say: Callable[[str], None], name: str):
        self.say, self.name = say, name

    def on_step_end(self, args, state, control, **kwargs):
        self.say(f"fine-tune {self.name}: step {state.global_step}/{state.max_steps}")


def counted(say: Callable[[str], None], suffix: str, text: str) -> None:
    say(f"{text} {suffix}")
