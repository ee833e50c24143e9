"""Under ``accelerate launch`` one process saves and evaluates while the others wait (issue 22,
item 8). An evaluation with a real judge outlasts NCCL's collective timeout, so the others wait on
a file, not on a barrier: a gloo group with a 2-second timeout and a judge that takes 4 seconds."""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta

import pytest
import torch.multiprocessing as mp

TIMEOUT_S = 2
JUDGE_DELAY_S = 4.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, folder: str, how: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from pathlib import Path

    from accelerate import PartialState

    from saediff.evaluation.fake_server import FakeOpenAIServer
    from saediff.evaluation.judges import HttpJudge
    from saediff.evaluation.openai_api import ChatClient
    from saediff.interventions.processes import main_then_all as _main_then_all

    state = PartialState(cpu=True, backend="gloo", timeout=timedelta(seconds=TIMEOUT_S))
    done = Path(folder) / "em.json"

    def evaluate() -> dict:  # the main process's evaluation: one answer, a slow judge
        with FakeOpenAIServer(delay_s=JUDGE_DELAY_S) as server:
            score = HttpJudge("aligned", ChatClient(server.url), "fake").score(
                [("Q?", "A.")], progress=False
            )[0]
        result = {"aligned": score.score}
        done.write_text(json.dumps(result))
        return result

    try:
        if how == "barrier":  # what block_one did: the others sit in a collective while rank 0 evaluates
            if state.is_main_process:
                evaluate()
            state.wait_for_everyone()
            result = json.loads(done.read_text())
        else:
            result = _main_then_all(evaluate, done, poll_s=0.2)
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps({"ok": True, **result}))
    except Exception as e:
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps({"ok": False, "error": type(e).__name__}))


def _run(tmp_path, how: str) -> dict:
    folder = tmp_path / how
    folder.mkdir()
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(folder), how)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return {
        r: json.loads((folder / f"rank{r}.json").read_text())
        for r in range(2)
        if (folder / f"rank{r}.json").exists()
    }


@pytest.mark.slow  # two spawned processes import torch: ~15 s each
def test_other_ranks_outwait_a_slow_evaluation(tmp_path):
    seen = _run(tmp_path, "file")
    assert seen[0] == seen[1] == {"ok": True, "aligned": 90.0}


@pytest.mark.slow
def test_a_barrier_would_time_out_under_the_same_group(tmp_path):
    """The control: the same group and judge with the old barrier, so the test above means something."""
    seen = _run(tmp_path, "barrier")
    assert seen.get(1, {}).get("ok") is not True
