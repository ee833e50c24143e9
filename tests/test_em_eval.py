"""What a real judge and a long run do to an EM evaluation: labels and numbers spread over several
tokens, judge failures (left out of the rates, counted, never cached), and generations appended
batch by batch so an interrupted run resumes with the answers it would have given."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import pytest
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.data.prompts import Prompt, load_prompts
from saediff.errors import SaediffError
from saediff.evaluation.evals import EMConfig, LocalGenerator, RemoteGenerator, evaluate_em, wilson_interval
from saediff.evaluation.fake_server import FakeOpenAIServer
from saediff.evaluation.judges import HttpJudge
from saediff.evaluation.openai_api import ChatClient
from saediff.models.loading import load_model


def judge(server, kind="aligned", **kw):
    return HttpJudge(kind, ChatClient(server.url, backoff_s=0.01, max_retries=1), "judge-model", **kw)


def one(server, answer="a", **kw):
    return judge(server, **kw).score([("q", answer)], progress=False)[0]


# --- labels and numbers in several tokens ---------------------------------------------------------


def test_multi_token_labels_with_logprobs():
    # REF|USA|L and COD|E: the label is read from the whole reply, not its first token
    with FakeOpenAIServer(judge_fn=lambda p: {"REFUSAL": 0.9, "50": 0.1}, token_chars=3) as server:
        s = one(server)
        assert server.requests[0]["max_tokens"] >= 3
    assert s.label == "REFUSAL" and s.score is None
    with FakeOpenAIServer(judge_fn=lambda p: {"CODE": 0.95, "10": 0.05}, token_chars=3) as server:
        assert one(server).label == "CODE"


def test_number_split_into_digits_is_read_from_the_text():
    # Qwen's tokenizer writes 85 as 8|5: the first token's top_logprobs weigh digits 8 and 9, not
    # numbers 85 and 90 (that mean would be 8.3), so the number is read from the reply
    with FakeOpenAIServer(judge_fn=lambda p: {"85": 0.7, "90": 0.3}, token_chars=1) as server:
        s = one(server)
    assert s.score == 85.0 and s.numeric_mass is None and s.label is None
    # a number in one token keeps the probability-weighted mean
    with FakeOpenAIServer(judge_fn=lambda p: {"85": 0.7, "90": 0.3}, token_chars=3) as server:
        s = one(server)
    assert s.score == pytest.approx(86.5) and s.numeric_mass == pytest.approx(1.0)


def test_multi_token_replies_without_logprobs():
    with FakeOpenAIServer(judge_fn=lambda p: {"REFUSAL": 1.0}, token_chars=3, logprobs=False) as server:
        assert one(server).label == "REFUSAL"
    with FakeOpenAIServer(judge_fn=lambda p: {"85": 1.0}, token_chars=1, logprobs=False) as server:
        s = one(server)
    assert s.score == 85.0 and s.numeric_mass is None


# --- judge failures -------------------------------------------------------------------------------


def test_unscored_reply_is_not_cached_and_is_asked_again(tmp_path):
    cache = tmp_path / "cache.jsonl"
    with FakeOpenAIServer(judge_fn=lambda p: {"Sure": 1.0}) as server:  # no number, no label
        assert one(server, cache_path=cache).score is None
        assert not cache.exists() or cache.read_text() == ""
        server.judge_fn = lambda p: {"90": 1.0}  # the judge recovers: the next run asks again
        assert one(server, cache_path=cache).score == 90.0
        assert len(server.requests) == 2
        assert one(server, cache_path=cache).score == 90.0  # now it is cached
        assert len(server.requests) == 2


def test_unscored_row_of_an_older_cache_is_asked_again(tmp_path):
    cache = tmp_path / "cache.jsonl"
    with FakeOpenAIServer() as server:
        j = judge(server, cache_path=cache)
        cache.write_text(
            json.dumps(
                {"key": j._key("q", "a"), "value": {"score": None, "label": None, "numeric_mass": 0.0}}
            )
            + "\n"
        )
        assert one(server, cache_path=cache).score == 90.0 and len(server.requests) == 1


def _judge(prompt: str) -> dict[str, float]:
    answer = prompt.split("[ANSWER START]", 1)[-1]
    if "how coherent" in prompt:
        return {"80": 1.0}
    if "EVIL" in answer:
        return {"10": 1.0}
    if "NOPE" in answer:
        return {"REFUSAL": 0.6, "10": 0.4}  # a label and a score: the label wins, not misaligned
    if "GARBLE" in answer:
        return {"Sure": 1.0}  # the judge fails on this answer
    return {"90": 1.0}


def _evaluate(server, out, n_garbled: int, samples: int = 1):
    """20 questions answered by the fake server: q0 EVIL, q1 NOPE, the next n_garbled GARBLE."""
    prompts = [Prompt(f"q{i}", [{"role": "user", "content": f"question {i}"}]) for i in range(20)]
    answer = {
        f"question {i}": "EVIL" if i == 0 else "NOPE" if i == 1 else "GARBLE" if i < 2 + n_garbled else "kind"
        for i in range(20)
    }
    server.generate_fn = lambda messages: answer[messages[-1]["content"]]
    client = ChatClient(server.url, backoff_s=0.01, max_retries=1)
    judges = [
        HttpJudge(k, client, "j", cache_path=out / f"judge_cache_{k}.jsonl") for k in ("aligned", "coherent")
    ]
    return evaluate_em(RemoteGenerator(client, "served"), prompts, *judges, EMConfig(samples=samples), out)


def test_unscored_answers_leave_the_denominator(tmp_path, caplog):
    with (
        FakeOpenAIServer(judge_fn=_judge) as server,
        caplog.at_level(logging.WARNING, "saediff.evaluation.evals"),
    ):
        report = _evaluate(server, tmp_path, n_garbled=2, samples=1)
    # 20 answers: 2 unscored (10%, allowed), 1 REFUSAL, 1 misaligned -> 1 / 18
    assert report.em_rate == pytest.approx(1 / 18) and report.em_rate_ci == wilson_interval(1, 18)
    assert report.n_responses == 20 and report.extra["n_unscored"] == 2 and report.extra["n_scored"] == 18
    assert report.extra["n_code_or_refusal"] == 1 and report.per_question["q1"] == 0.0
    assert (
        "q2" not in report.per_question
        and "q3" not in report.per_question
        and report.per_question["q0"] == 1.0
    )
    assert report.coherent_rate == 1.0
    assert "2 of 20 answers unscored" in caplog.text
    rows = [json.loads(x) for x in (tmp_path / "responses.jsonl").read_text().splitlines()]
    assert [r["scored"] for r in rows[:4]] == [True, True, False, False]


def test_too_many_unscored_fails_and_a_rerun_asks_only_for_them(tmp_path):
    with FakeOpenAIServer(judge_fn=_judge) as server:
        with pytest.raises(SaediffError, match=rf"^{tmp_path}: 3 of 20 answers unscored by the judges"):
            _evaluate(server, tmp_path, n_garbled=3)
        assert not (tmp_path / "em.json").exists() and (tmp_path / "responses.jsonl").exists()
        n_judged = len([b for b in server.requests if b.get("logprobs")])
        server.judge_fn = lambda p: _judge(p.replace("GARBLE", "kind"))  # the judge recovers
        report = _evaluate(server, tmp_path, n_garbled=3)
        asked_again = len([b for b in server.requests if b.get("logprobs")]) - n_judged
    assert asked_again == 3  # the three failed aligned scores; everything else came from the caches
    assert report.extra["n_unscored"] == 0 and report.em_rate == pytest.approx(1 / 20)
    assert (tmp_path / "em.json").exists()


# --- generations appended per batch; a rerun resumes ----------------------------------------------


@dataclass
class InterruptedGenerator(LocalGenerator):
    """The local generator, stopped (as by Ctrl-C or a crash) before its ``stop_before``-th batch."""

    stop_before: int = 10**9
    batches: list[int] = field(default_factory=list)

    def __call__(self, conversations, cfg, *args):
        if len(self.batches) == self.stop_before:
            raise KeyboardInterrupt
        self.batches.append(len(conversations))
        return super().__call__(conversations, cfg, *args)


def test_interrupted_generation_resumes_with_the_same_answers(tiny_qwen, tmp_path):
    lm = load_model(str(tiny_qwen / "model"))
    prompts = load_prompts("first_plot")[:3]
    cfg = EMConfig(samples=2, max_new_tokens=4, batch_size=2)  # 6 answers in 3 batches, sampled at T=1

    def run(out, gen):
        with FakeOpenAIServer() as server:
            client = ChatClient(server.url)
            return evaluate_em(
                gen, prompts, HttpJudge("aligned", client, "j"), HttpJudge("coherent", client, "j"), cfg, out
            )

    def saved(out):
        return [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]

    run(tmp_path / "whole", LocalGenerator(lm))
    whole = saved(tmp_path / "whole")
    assert len({r["response"] for r in whole}) > 1

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(out, InterruptedGenerator(lm, stop_before=2))
    assert saved(out) == whole[:4]  # the two finished batches were kept
    lines = (out / "generations.jsonl").read_text().splitlines(keepends=True)
    (out / "generations.jsonl").write_text("".join(lines[:3]) + lines[3][:25])  # the last line torn mid-write

    resumed = InterruptedGenerator(lm)
    run(out, resumed)
    assert resumed.batches == [2, 2]  # batch 1 (its torn row) and batch 2; batch 0 not again
    assert saved(out) == whole
    again = InterruptedGenerator(lm)
    run(out, again)
    assert again.batches == []
    other = InterruptedGenerator(lm)  # another condition never reuses these rows
    with FakeOpenAIServer() as server:
        client = ChatClient(server.url)
        evaluate_em(
            other,
            prompts,
            HttpJudge("aligned", client, "j"),
            HttpJudge("coherent", client, "j"),
            cfg,
            out,
            condition="steer sae_1 x4",
        )
    assert other.batches == [2, 2, 2]


def test_remote_generation_sends_a_seed_per_answer(tmp_path):
    with FakeOpenAIServer() as server:
        client = ChatClient(server.url)
        prompts = [Prompt("q0", [{"role": "user", "content": "hi"}])]
        evaluate_em(
            RemoteGenerator(client, "m"),
            prompts,
            HttpJudge("aligned", client, "j"),
            HttpJudge("coherent", client, "j"),
            EMConfig(samples=3, batch_size=2),
            tmp_path,
        )
        seeds = [b["seed"] for b in server.requests if not b.get("logprobs")]
    assert len(set(seeds)) == 3


# --- saediff eval --gen-url -----------------------------------------------------------------------


def test_gen_url_gets_its_own_key_not_the_judges(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "judge-secret")
    monkeypatch.setenv("GEN_KEY", "gen-secret")
    base = ["eval", "--model", "served", "--judge-model", "j", "--samples", "1"]
    with FakeOpenAIServer() as judge_server, FakeOpenAIServer() as gen_server:
        base += ["--judge-url", judge_server.url, "--gen-url", gen_server.url]
        result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a")])
        assert result.exit_code == 0, result.output
        assert gen_server.authorization and set(gen_server.authorization) == {None}
        assert set(judge_server.authorization) == {"Bearer judge-secret"}
        gen_server.authorization.clear()
        result = CliRunner().invoke(
            app, [*base, "--gen-api-key-env", "GEN_KEY", "--out", str(tmp_path / "b")]
        )
        assert result.exit_code == 0, result.output
        assert set(gen_server.authorization) == {"Bearer gen-secret"}


def test_adapter_with_gen_url_is_one_line(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            "served",
            "--adapter",
            str(tmp_path / "lora"),
            "--gen-url",
            "http://127.0.0.1:9/v1",
            "--judge-url",
            "http://127.0.0.1:9/v1",
            "--judge-model",
            "j",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1
    assert "--adapter" in result.output and "--gen-url" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
