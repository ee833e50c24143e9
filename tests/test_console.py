"""The quiet console: saediff's own progress as one line per step or ~10% of a loop where nothing can
be redrawn (no carriage return), one shared live display in a terminal, and no third-party bars or
warnings inside a command unless ``--verbose``.

``TTY_COMPATIBLE`` is rich's switch for "this is (not) a terminal"; ``TQDM_DISABLE`` (set for every
test by conftest.py) hides saediff's progress, so these tests unset it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from saediff import console


@pytest.fixture
def log_lines(monkeypatch, caplog):
    """Progress shown, not in a terminal; returns a function giving the lines logged so far."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    monkeypatch.setattr(console, "LONG_S", 0.0)  # every loop counts as long here
    caplog.set_level(logging.INFO, logger="saediff.console")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "saediff.console"]


def test_a_loop_logs_one_line_per_tenth(log_lines):
    assert list(console.progress(range(100), desc="collect")) == list(range(100))
    lines = log_lines()
    assert [line.split()[1] for line in lines] == [f"{n}/100" for n in range(10, 101, 10)]
    assert lines[0].startswith("collect: 10/100 (10%)") and lines[-1].startswith("collect: 100/100 (100%)")
    assert not any("\r" in line or "\x1b" in line for line in lines)


def test_short_unknown_and_hidden_loops(log_lines, monkeypatch):
    list(console.progress([1, 2, 3], desc="judge"))  # shorter than 10: a line per item
    assert [line.split()[1] for line in log_lines()] == ["1/3", "2/3", "3/3"]
    list(console.progress(iter(range(25)), desc="stream"))  # no length: 1, 10, ... and the end
    assert log_lines()[3:] == ["stream: 1", "stream: 10", "stream: 25 done in 0s"]
    list(console.progress(range(50), desc="quiet", enabled=False))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    list(console.progress(range(50), desc="tests"))
    assert len(log_lines()) == 6


def test_named_steps_are_lines_and_a_counting_step_is_a_loop(log_lines):
    with console.steps("demo") as say:
        say("build")
        for step in range(1, 301):
            say(f"fine-tune plain: step {step}/300")
        say("report")
    lines = log_lines()
    assert lines[0] == "demo: build" and lines[-1] == "demo: report"
    counted = [line.rsplit(" ", 1)[1] for line in lines[1:-1]]
    assert counted == ["1/300", *[f"{n}/300" for n in range(30, 301, 30)]]


def test_a_task_advances_by_hand(log_lines):
    with console.task(20, desc="fine-tune plain") as advance:
        advance(10)  # resumed at step 10
        for _ in range(10):
            advance()
    assert [line.split()[2] for line in log_lines()] == [f"{n}/20" for n in (10, 12, 14, 16, 18, 20)]


def test_nested_loops_share_one_live_display(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    seen = []
    with console.steps("demo") as say:
        for _ in console.progress(range(2), desc="outer"):
            for _ in console.progress(range(3), desc="inner"):
                say("diff")
                seen.append((id(console._display), [t.description for t in console._display.tasks]))
    assert len({display for display, _ in seen}) == 1
    assert all(rows == ["demo: diff", "outer", "inner"] for _, rows in seen)
    assert console._display is None  # stopped with its last row
    for i in console.progress(range(10), desc="broken off"):
        if i == 2:
            break
    assert console._display is None


def _run_saediff(args, env_extra, tmp_path):
    # without the switches a command run in this process (CliRunner) leaves for worker processes
    drop = ("TQDM_DISABLE", "SAEDIFF_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")
    env = {k: v for k, v in os.environ.items() if k not in (*drop, "PYTHONWARNINGS")}
    env.update(HF_HUB_OFFLINE="1", TTY_COMPATIBLE="0", **env_extra)  # captured: not a terminal
    res = subprocess.run(
        [sys.executable, "-m", "saediff", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout + res.stderr


def test_a_command_prints_no_third_party_bars(tiny_qwen, tmp_path):
    """``saediff eval`` loads a model with transformers (its "Loading weights" bar) and scores
    answers in batches (saediff's own loop): only saediff's lines come out, without a carriage
    return; with --verbose (here SAEDIFF_VERBOSE=1) the transformers bar is back, so the quiet run
    is quiet because of the CLI's setup, not by chance."""
    args = ["eval", "--model", str(tiny_qwen / "model"), "--pairs", "medical"]
    quiet = _run_saediff([*args, "--out", str(tmp_path / "quiet")], {"SAEDIFF_PROGRESS_AFTER": "0"}, tmp_path)
    assert "Loading weights" not in quiet and "\r" not in quiet and "Warning" not in quiet
    assert re.search(r"^score answers: (\d+)/\1 \(100%\)", quiet, re.M) and '"preference"' in quiet
    loud = _run_saediff([*args, "--out", str(tmp_path / "loud")], {"SAEDIFF_VERBOSE": "1"}, tmp_path)
    assert "Loading weights" in loud


def test_a_fine_tune_mentions_resuming_only_when_it_resumes(tiny_qwen, tmp_path, caplog):
    """``resume=True`` (the chat demo passes it on every run) says nothing when there is no
    checkpoint, and names the run and its step when there is one."""
    from saediff.data.chat_data import ChatDataset
    from saediff.interventions.finetune import FinetuneConfig, finetune, make_trainable
    from saediff.models.loading import load_model

    cfg = FinetuneConfig(steps=2, batch_size=2, save_every=2, lr=1e-3)
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]] * 4

    def run() -> None:
        lm = load_model(str(tiny_qwen / "model"))
        data = ChatDataset(lm.tokenizer, chats, progress=False)
        finetune(make_trainable(lm.model, cfg), lm.tokenizer, data, cfg, tmp_path / "plain", resume=True)

    with caplog.at_level(logging.INFO, logger="saediff.interventions.finetune"):
        run()
        assert "resum" not in caplog.text and "checkpoint" not in caplog.text
        run()
    assert f"resuming fine-tune {tmp_path / 'plain'} from step 2" in caplog.text


def test_a_quick_loop_says_nothing_where_nothing_is_redrawn(monkeypatch, caplog):
    """Only a long loop reports its tenths in a log: a loop done before ``LONG_S`` writes no line."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    caplog.set_level(logging.INFO, logger="saediff.console")
    clock = iter(range(0, 1000, 1))  # each call to the clock: one second later
    monkeypatch.setattr(console.time, "monotonic", lambda: float(next(clock)))
    list(console.progress(range(10), desc="slow"))  # 1 s per item: the tenths from 2 s on
    monkeypatch.setattr(console, "LONG_S", 1e9)
    list(console.progress(range(10), desc="quick"))
    lines = [r.getMessage() for r in caplog.records if r.name == "saediff.console"]
    assert lines and all(line.startswith("slow: ") for line in lines)
    assert lines[-1].startswith("slow: 10/10 (100%)") and not any(
        line.startswith("slow: 1/10") for line in lines
    )
