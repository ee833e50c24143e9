"""saediff's one progress display: loops (``progress``) and a long job's named steps (``steps``).

In a terminal every loop and step of the process shares one rich ``Progress`` on stderr: a row per
loop with its bar, count, elapsed time and ETA, a nested loop one more row, each row gone when its
loop ends. Anywhere else (a log file, CI, captured output) nothing is redrawn and there is no
carriage return: a named step is one line, a long loop (``LONG_S`` and more) one line per ~10%
of it. Those lines go through ``logging`` (logger ``saediff.console``, level INFO) rather than
straight to stderr, because library code logs and never prints: the CLI sends them to stderr beside saediff's other messages, a worker
process to its log file, and a library user routes or silences them like any other saediff log.

    for batch in progress(batches, desc="collect"):
        ...
    with task(cfg.steps, desc="fine-tune") as advance:  # work that is not a loop: advance() per step
        trainer.train()
    with steps("demo") as say:
        run_demo(out, progress=say)

Nothing shows when ``enabled`` is False or ``TQDM_DISABLE`` is set (tests, CI, the demos' worker
processes), as with the tqdm bars this replaces.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from saediff._io import no_progress

__all__ = ["StderrHandler", "progress", "steps", "task"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_display = None  # the rich Progress while a loop or step shows in a terminal (one per process)
_rows = 0  # loops and steps showing on it; the last one to end stops it
LONG_S = 2.0
"""seconds a loop runs before its ~10% lines start where nothing is redrawn: a quick loop says
nothing (``SAEDIFF_PROGRESS_AFTER=0`` shows every loop)"""
_COUNT = re.compile(r"(\d+)/(\d+)")  # a step text that counts, e.g. "fine-tune plain: step 40/300"


def progress(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True
) -> Iterator[T]:
    """``iterable``'s items, shown as a bar (terminal) or one log line per ~10% (elsewhere; every
    item of a loop shorter than 10, and at 1, 10, 100, ... items and the end when the length is
    unknown). ``total`` defaults to ``len(iterable)``."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with task(total, desc=desc, enabled=enabled) as advance:
        for item in iterable:
            yield item
            advance()


@contextmanager
def task(total: int | None, *, desc: str = "", enabled: bool = True) -> Iterator[Callable[..., None]]:
    """An ``advance(n=1)`` for work that is not a loop over an iterable (a Trainer's optimizer
    steps), shown as ``progress`` shows a loop of ``total`` items for the duration of the block."""
    if no_progress(enabled):
        yield lambda n=1: None
        return
    if _live():
        with _row(desc, total) as (display, row):
            yield lambda n=1: display.advance(row, n)
        return
    desc, start, done, shown = desc or "progress", time.monotonic(), 0, 0

    def advance(n: int = 1) -> None:
        nonlocal done, shown
        done += n
        long = time.monotonic() - start >= _long_s()
        if total and done * 10 // total > shown:
            shown = done * 10 // total
            if long:
                log.info("%s", _loop_line(desc, done, total, time.monotonic() - start))
        elif not total and _is_power_of_ten(done) and long:
            log.info("%s: %d", desc, done)

    yield advance
    if not total and time.monotonic() - start >= _long_s():  # reached only when the block ends normally
        log.info("%s: %d done in %s", desc, done, _duration(time.monotonic() - start))


@contextmanager
def steps(title: str, *, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A ``say(text)`` for a long job's named steps (``run_demo(progress=say)``): one row
    ``title: text`` in a terminal, one log line per step elsewhere; a text that counts
    (``fine-tune plain: step 40/300``) is a loop there, one line per ~10% of it."""
    if no_progress(enabled):
        yield lambda _text: None
        return
    if _live():
        with _row(title, None) as (display, row):
            yield lambda text: display.update(row, description=f"{title}: {text}")
        return
    last: list = [None, -1]  # the shape of the last text logged, and its tenth when it counted

    def say(text: str) -> None:
        m = _COUNT.search(text)
        tenth = 10 * int(m[1]) // max(int(m[2]), 1) if m else -1
        shape = _COUNT.sub("N/M", text)
        if m is None or shape != last[0] or tenth > last[1]:
            last[:] = [shape, tenth]
            log.info("%s: %s", title, text)

    yield say


class StderrHandler(logging.StreamHandler):
    """A log handler writing to whatever ``sys.stderr`` is at each record, so that log lines land
    above a live display (rich swaps ``sys.stderr`` for a proxy while one shows) rather than
    through it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass  # always the current sys.stderr


def _long_s() -> float:
    return float(os.environ.get("SAEDIFF_PROGRESS_AFTER", LONG_S))


def _live() -> bool:
    """Whether to draw: a display is already up, or this is the main process of a terminal or a
    notebook (a worker process logs lines instead of fighting its parent for the screen)."""
    if _display is not None:
        return True
    if multiprocessing.parent_process() is not None:
        return False
    from rich.console import Console

    console = Console(stderr=True)
    return console.is_terminal or console.is_jupyter


@contextmanager
def _row(description: str, total: int | None) -> Iterator[tuple]:
    """A row of the shared display (started with the first row, stopped with the last) for the
    duration of the block; yields ``(display, task id)``."""
    global _display, _rows
    if _display is None:
        _display = _new_display()
        _display.start()
    _rows += 1
    row = _display.add_task(description, total=total)
    display = _display
    try:
        yield display, row
    finally:
        display.remove_task(row)
        _rows -= 1
        if _rows == 0:
            display.stop()
            _display = None


def _new_display():
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Counted(ProgressColumn):
        """``column`` for a loop; blank for a step, which has no length."""

        def __init__(self, column: ProgressColumn):
            super().__init__()
            self.column = column

        def render(self, task):
            return Text("") if task.total is None else self.column.render(task)

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),  # pulses for a step
        Counted(MofNCompleteColumn()),
        TimeElapsedColumn(),
        Counted(TimeRemainingColumn()),
        console=Console(stderr=True),
        transient=True,
    )


def _loop_line(desc: str, n: int, total: int, elapsed: float) -> str:
    left = "" if n >= total else f", ~{_duration(elapsed / n * (total - n))} left"
    return f"{desc}: {n}/{total} ({100 * n // total}%), {_duration(elapsed)}{left}"


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s" if m else f"{s}s"


def _is_power_of_ten(n: int) -> bool:
    return str(n).rstrip("0") == "1"
