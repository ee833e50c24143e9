"""Which process does the work under ``accelerate launch``: the main one saves and evaluates, the
others wait for it (a single process just works)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from saediff._io import atomic_write_json

__all__ = ["is_main_process", "main_then_all", "wait_for_everyone"]


def main_then_all(work: Callable[[], dict], done: Path, poll_s: float = 1.0) -> dict:
    """``work()`` on the main process (saving, evaluating: hours with a slow judge), while the
    other ranks wait for a marker file it writes when ``done`` is complete, instead of waiting on a
    collective barrier that NCCL would time out; then every rank returns ``done``'s content. The
    marker's name is agreed per call (one quick broadcast), so a stale file is never taken for it.
    Single process: ``work()``."""
    import time

    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    if state.num_processes == 1:
        return work()
    token = broadcast_object_list([str(time.time_ns()) if state.is_main_process else None])[0]
    marker = done.with_name(f".{done.name}.{token}.ready")
    if state.is_main_process:
        result = work()
        atomic_write_json(marker, {})
        state.wait_for_everyone()
        marker.unlink()
        return result
    while not marker.exists():
        time.sleep(poll_s)
    state.wait_for_everyone()
    return json.loads(done.read_text())


def is_main_process() -> bool:
    """Whether this is the main process (always, without ``accelerate launch``)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    """A barrier across the processes (a no-op in a single process)."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()
