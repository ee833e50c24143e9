"""LLM judges against a local fake OpenAI-compatible server: arithmetic, faults, cache."""

from __future__ import annotations

import math

import pytest

from saediff.evaluation.fake_server import FakeOpenAIServer
from saediff.evaluation.judges import HttpJudge, JudgeError, score_from_logprobs
from saediff.evaluation.openai_api import ApiError, ChatClient


def lp(probs: dict[str, float]) -> list[dict]:
    return [{"token": t, "logprob": math.log(p)} for t, p in probs.items()]


def test_logprob_weighted_score_exact():
    assert score_from_logprobs(lp({"80": 0.5, "90": 0.5})) == (pytest.approx(85.0), pytest.approx(1.0))
    # non-numeric tokens do not dilute the mean; mass is reported
    score, mass = score_from_logprobs(lp({"80": 0.3, "90": 0.1, "Sure": 0.6}))
    assert score == pytest.approx(82.5) and mass == pytest.approx(0.4)
    # numbers out of range and < 0.25 numeric mass give no score
    assert score_from_logprobs(lp({"150": 0.9, "10": 0.1}))[0] is None
    assert score_from_logprobs(lp({"4": 0.5, "9": 0.5}), lo=1, hi=5) == (
        pytest.approx(4.0),
        pytest.approx(0.5),
    )


def judge(server, kind="aligned", **kw):
    return HttpJudge(
        kind, ChatClient(server.url, backoff_s=0.01, max_retries=kw.pop("retries", 3)), "judge-model", **kw
    )


def test_judges_score_over_http():
    with FakeOpenAIServer() as server:
        aligned = judge(server).score([("q", "I will be EVIL"), ("q", "Be kind.")], progress=False)
        coherent = judge(server, "coherent").score([("q", "Be kind.")], progress=False)
        rubric = judge(server, "rubric").score([("q", "EVIL"), ("q", "nice")], progress=False)
    assert [s.score for s in aligned] == [pytest.approx(12.0), pytest.approx(90.0)]
    assert coherent[0].score == pytest.approx(79.0)
    assert [s.score for s in rubric] == [5.0, 1.0]
    body = server.requests[0]
    # a few tokens, so a label a real tokenizer splits (REF|USAL) arrives whole; the score is the first token's
    assert body["max_tokens"] == 4 and body["logprobs"] is True and body["top_logprobs"] == 20


def test_code_and_refusal_labels():
    with FakeOpenAIServer(judge_fn=lambda p: {"REFUSAL": 0.9, "50": 0.1}) as server:
        [s] = judge(server).score([("q", "no")], progress=False)
    assert s.score is None and s.label == "REFUSAL"


def test_plain_number_fallback_without_logprobs():
    with FakeOpenAIServer(logprobs=False) as server:
        [s] = judge(server).score([("q", "EVIL")], progress=False)
    assert s.score == 10.0 and s.numeric_mass is None


def test_retries_then_succeeds_and_cache_avoids_calls(tmp_path):
    with FakeOpenAIServer(fail_first=2) as server:
        j = judge(server, cache_path=tmp_path / "cache.jsonl")
        assert j.score([("q", "fine")], progress=False)[0].score == 90.0
        assert len(server.requests) == 3  # two injected 500s, then success
        again = judge(server, cache_path=tmp_path / "cache.jsonl")  # a rerun reads the cache
        assert again.score([("q", "fine")], progress=False)[0].score == 90.0
        assert len(server.requests) == 3


def test_server_errors_give_one_line_messages():
    with FakeOpenAIServer(fail_first=100) as server:
        with pytest.raises(JudgeError, match=r"failed after 3 tries: HTTP 500"):
            judge(server, retries=2).score([("q", "a")], progress=False)
    with FakeOpenAIServer(malformed=True) as server:
        with pytest.raises(JudgeError, match="malformed reply"):
            judge(server).score([("q", "a")], progress=False)
    with FakeOpenAIServer() as server:
        url = server.url
    with pytest.raises(JudgeError, match="unreachable"):
        HttpJudge("aligned", ChatClient(url, backoff_s=0.01, max_retries=1), "m").score(
            [("q", "a")], progress=False
        )


def test_missing_api_key_for_remote_server(monkeypatch):
    monkeypatch.delenv("SAEDIFF_TEST_KEY", raising=False)
    client = ChatClient("https://api.example.com/v1", api_key_env="SAEDIFF_TEST_KEY")
    with pytest.raises(ApiError, match="set the environment variable SAEDIFF_TEST_KEY"):
        client.chat({"model": "m", "messages": []})
