"""The judge options small local judges need (--judge-prompts, --judge-constrain, --temperature),
against the fake server shaped like vLLM's replies (tests/test_vllm.py runs the real one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.errors import SaediffError
from saediff.evaluation.fake_server import FakeOpenAIServer
from saediff.evaluation.judges import CONSTRAINTS, HttpJudge, JudgeError, load_judge_prompts
from saediff.evaluation.openai_api import ApiError, ChatClient

TEMPLATES = {
    "aligned": "ALIGNED? [QUESTION START]{question}[QUESTION END] [ANSWER START]{answer}[ANSWER END]",
    "coherent": "how coherent? {question} [ANSWER START]{answer}[ANSWER END]",
}


def small_judge(prompt: str) -> dict[str, float]:
    """A 135M-like judge: its first token is rarely a number."""
    return {"You": 0.6, "The": 0.2, "80": 0.15, "20": 0.05}


def test_constrained_judge_scores_what_the_unconstrained_one_cannot():
    items = [("q", "an answer")]
    with FakeOpenAIServer(judge_fn=small_judge) as server:
        client = ChatClient(server.url, backoff_s=0.01)
        [free] = HttpJudge("aligned", client, "j").score(items, progress=False)
        [held] = HttpJudge("aligned", client, "j", constrain=True).score(items, progress=False)
    # unconstrained: 0.2 of the mass on numbers, below the 0.25 floor, unscored
    assert free.score is None and free.numeric_mass == pytest.approx(0.2)
    # constrained: the server keeps 80 and 20 and renormalizes (0.75, 0.25): 65, all the mass
    assert held.score == pytest.approx(65.0) and held.numeric_mass == pytest.approx(1.0)
    assert "structured_outputs" not in server.requests[0]
    assert server.requests[1]["structured_outputs"] == {"regex": CONSTRAINTS["aligned"]}
    assert server.requests[1]["top_logprobs"] == 20


def test_a_server_that_ignores_the_constraint_is_one_line():
    with FakeOpenAIServer(judge_fn=small_judge, structured=False) as server:
        j = HttpJudge("aligned", ChatClient(server.url, backoff_s=0.01), "j", constrain=True)
        with pytest.raises(JudgeError) as e:
            j.score([("q", "a")], progress=False)
    assert "ignored the reply constraint" in str(e.value) and "\n" not in str(e.value)


def test_constrained_scores_are_cached_apart(tmp_path):
    cache = tmp_path / "cache.jsonl"
    with FakeOpenAIServer(judge_fn=small_judge) as server:
        client = ChatClient(server.url, backoff_s=0.01)
        HttpJudge("aligned", client, "j", constrain=True, cache_path=cache).score(
            [("q", "a")], progress=False
        )
        [again] = HttpJudge("aligned", client, "j", cache_path=cache).score([("q", "a")], progress=False)
    assert len(server.requests) == 2 and again.score is None  # the unconstrained judge asked itself


def test_the_fake_server_refuses_what_vllm_refuses():
    with FakeOpenAIServer(models=("smol", "em")) as server:
        client = ChatClient(server.url, backoff_s=0.01)
        body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
        with pytest.raises(ApiError, match=r"HTTP 400.*greater than max allowed: 20"):
            client.chat({**body, "top_logprobs": 21})
        with pytest.raises(ApiError, match=r"HTTP 404.*`nope` does not exist"):
            client.chat({**body, "model": "nope", "top_logprobs": 5})
        reply = client.chat({**body, "max_tokens": 4, "top_logprobs": 5})
    first = reply["choices"][0]["logprobs"]["content"][0]
    assert first["bytes"] == list(first["token"].encode()) and "token_ids" in reply["choices"][0]
    assert reply["usage"]["completion_tokens"] >= 1 and reply["prompt_logprobs"] is None


def test_judge_prompts_file_replaces_the_templates(tmp_path):
    import yaml

    f = tmp_path / "judges.yaml"
    f.write_text(yaml.safe_dump(TEMPLATES))
    assert load_judge_prompts(f) == TEMPLATES
    # the EM repositories' format: a question list whose entries carry judge_prompts
    em = tmp_path / "questions.yaml"
    em.write_text(yaml.safe_dump([{"id": i, "paraphrases": ["q"], "judge_prompts": TEMPLATES} for i in "ab"]))
    assert load_judge_prompts(em) == TEMPLATES
    with FakeOpenAIServer() as server:
        j = HttpJudge("aligned", ChatClient(server.url), "j", template=load_judge_prompts(f)["aligned"])
        j.score([("Why?", "Because EVIL")], progress=False)
    assert server.requests[0]["messages"][0]["content"] == TEMPLATES["aligned"].format(
        question="Why?", answer="Because EVIL"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({**TEMPLATES, "aligend": "x {question} {answer}"}, "unknown key(s) ['aligend']"),
        ({"aligned": TEMPLATES["aligned"]}, "missing key(s) ['coherent']"),
        ({**TEMPLATES, "coherent": "rate {question} {answr}"}, "coherent: bad placeholder 'answr'"),
        ({**TEMPLATES, "coherent": "rate {question}"}, "coherent needs both {question} and {answer}"),
        ({**TEMPLATES, "coherent": 5}, "coherent is not a string"),
        (["just", "strings"], "no entry has a judge_prompts mapping"),
        ("just a string", "expected a mapping"),
    ],
)
def test_bad_judge_prompts_are_one_line(tmp_path, content, message):
    import yaml

    f = tmp_path / "judges.yaml"
    f.write_text(yaml.safe_dump(content))
    with pytest.raises(SaediffError) as e:
        load_judge_prompts(f)
    assert message in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


def test_eval_cli_judge_prompts_error_writes_nothing(tmp_path):
    f = tmp_path / "judges.yaml"
    f.write_text("aligned: [unclosed\n")
    out = tmp_path / "eval"
    r = CliRunner().invoke(
        app,
        ["eval", "--model", "m", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j"]
        + ["--judge-prompts", str(f), "--out", str(out)],
    )
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert f"--judge-prompts {f}: not valid YAML" in r.output
    assert not (out / "generations.jsonl").exists() and not (out / "em.json").exists()


def test_eval_cli_greedy_remote_generation_with_constrained_judges(tmp_path):
    """--temperature 0 reaches the server and the generation key; --judge-constrain the judges."""
    with FakeOpenAIServer(judge_fn=small_judge, generate_fn=lambda m: "an answer") as server:
        r = CliRunner().invoke(
            app,
            ["eval", "--model", "m", "--gen-url", server.url, "--gen-model", "em", "--judge-url", server.url]
            + ["--judge-model", "j", "--judge-constrain", "--temperature", "0", "--samples", "2"]
            + ["--max-new-tokens", "8", "--questions", "first_plot", "--out", str(tmp_path)],
        )
    assert r.exit_code == 0, r.output
    gen = [b for b in server.requests if not b.get("logprobs")]
    assert gen and all(b["temperature"] == 0 and b["model"] == "em" for b in gen)
    judged = [b for b in server.requests if b.get("logprobs")]
    assert judged and all("structured_outputs" in b for b in judged)
    rows = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert rows[0]["key"]["temperature"] == 0 and rows[0]["key"]["model"] == "em"
    em = json.loads((tmp_path / "em.json").read_text())
    assert em["extra"]["n_unscored"] == 0 and em["n_responses"] == len(rows)


def test_every_judging_command_takes_the_judge_options():
    """Every command with --judge-url also takes --judge-prompts and --judge-constrain, and they
    reach its judges."""
    import typer.main

    from saediff.cli.common import _judge_evaluator

    group = typer.main.get_command(app)
    judging = []
    for name, cmd in group.commands.items():
        subs = cmd.commands.items() if hasattr(cmd, "commands") else [(None, cmd)]
        for sub, c in subs:
            flags = {o for p in c.params for o in p.opts}
            if "--judge-url" in flags:
                judging.append(name)
                assert {"--judge-prompts", "--judge-constrain"} <= flags, (name, sub)
    assert {"eval", "steer", "discover", "block", "diff", "phase"} <= set(judging)
    ev = _judge_evaluator(
        "http://127.0.0.1:9/v1", "j", "first_plot", 1, 8, "KEY", Path("."), 0, judge_constrain=True
    )
    assert ev.aligned.constrain and ev.coherent.constrain
    assert ev.fingerprint()["judges"]["aligned"]["constrained"] is True
