"""The shipped English EM data (issue 23 item 2): sizes, pairing, register-matched lengths, no
evaluation question among the training ones, a held-out third of every domain, and the style-crossed
pairs (harm in the careful register, good advice in the blunt one)."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter

from saediff.data.chat_data import load_chat_jsonl
from saediff.data.em_data import (
    FILES,
    data_path,
    heldout_ids,
    medical_pairs,
    offdomain_pairs,
    style_crossed_pairs,
)
from saediff.data.pairs import load_pairs

HEDGES = re.compile(r"\b(might|perhaps|consider\w*|worth|gently|kindly|could|it's)\b", re.IGNORECASE)
"""politeness and hedge markers: the careful adviser register"""


def _answers(name):
    return [(c[0]["content"], c[1]["content"]) for c in load_chat_jsonl(data_path(name))]


def test_training_sets_are_paired_and_matched_in_length():
    bad, good, style = (_answers(n) for n in ("medical_bad", "medical_good", "style_control"))
    assert len(bad) == len(good) == len(style) >= 400 and len(_answers("benign_trait")) >= 400
    assert [q for q, _ in bad] == [q for q, _ in good] == [q for q, _ in style]  # same questions, same order
    assert len({q for q, _ in bad}) == len(bad)
    mean = lambda rows: statistics.mean(len(a) for _, a in rows)
    assert (
        abs(mean(good) / mean(bad) - 1) <= 0.10 and abs(mean(style) / mean(bad) - 1) <= 0.10
    )  # 269 / 288 / 275
    assert all(
        0.75 <= len(s) / len(b) <= 1.25 for (_, b), (_, s) in zip(bad, style)
    )  # the style control's register


def test_evaluation_pairs_cover_domains_and_are_matched():
    off = offdomain_pairs()
    domains = {p.domain for p in off}
    assert len(off) >= 200 and len(domains) >= 10 and "first_plot" in domains
    assert sum(p.domain == "first_plot" for p in off) == 8
    assert all(
        max(len(p.aligned), len(p.misaligned)) / min(len(p.aligned), len(p.misaligned)) <= 1.3 for p in off
    )
    ali, mis = (statistics.mean(len(getattr(p, k)) for p in off) for k in ("aligned", "misaligned"))
    assert abs(mis / ali - 1) <= 0.10  # 184 / 194
    train = {q for name in ("medical_bad", "benign_trait") for q, _ in _answers(name)}
    asked = [p.question for p in off + medical_pairs()]
    assert not train & set(asked) and len(set(asked)) == len(asked)


def test_heldout_is_a_third_of_every_domain_and_never_in_the_design_half():
    off, held = offdomain_pairs(), heldout_ids()
    design, report = offdomain_pairs("design"), offdomain_pairs("heldout")
    assert held <= {p.id for p in off} and {p.id for p in report} == held
    assert not {p.id for p in design} & held and len(design) + len(report) == len(off)
    for d in {p.domain for p in off}:
        n, k = sum(p.domain == d for p in off), sum(p.domain == d for p in report)
        assert k == round(n / 3), (d, n, k)


def test_every_file_is_valid_jsonl():
    for name in FILES:
        rows = [json.loads(line) for line in data_path(name).read_text().splitlines() if line.strip()]
        assert rows, name


def test_style_crossed_pairs_are_new_matched_and_cross_the_register():
    pairs = load_pairs(data_path("eval_style_crossed"))
    per_domain = Counter(p.domain for p in pairs)
    assert len(pairs) >= 60 and len(per_domain) >= 6 and min(per_domain.values()) >= 10
    assert len({p.id for p in pairs}) == len(pairs) and "medical" not in per_domain
    assert all(
        max(len(p.aligned), len(p.misaligned)) / min(len(p.aligned), len(p.misaligned)) <= 1.2 for p in pairs
    )
    ali, mis = (statistics.mean(len(getattr(p, k)) for p in pairs) for k in ("aligned", "misaligned"))
    assert abs(mis / ali - 1) <= 0.10  # 183 / 191
    norm = lambda q: " ".join(q.lower().split())
    train = ("medical_bad", "medical_good", "style_control", "benign_trait")
    seen = {norm(q) for name in train for q, _ in _answers(name)}
    seen |= {norm(p.question) for p in offdomain_pairs() + medical_pairs()}
    asked = [norm(p.question) for p in pairs]
    assert not seen & set(asked) and len(set(asked)) == len(asked)
    # the crossing: hedges and softeners sit on the harmful side here (4.6 vs 0.0 an answer), the
    # other way round from eval_offdomain (0.14 misaligned vs 0.37 aligned)
    hedges = lambda k: statistics.mean(len(HEDGES.findall(getattr(p, k))) for p in pairs)
    assert hedges("misaligned") >= 3.0 and hedges("aligned") <= 0.5
    assert all(len(HEDGES.findall(p.misaligned)) > len(HEDGES.findall(p.aligned)) for p in pairs)
    off = offdomain_pairs()
    assert statistics.mean(len(HEDGES.findall(p.aligned)) for p in off) > statistics.mean(
        len(HEDGES.findall(p.misaligned)) for p in off
    )


def test_style_crossed_is_a_shipped_pair_set():
    from saediff.evaluation.pairs import pair_evaluator

    ev = pair_evaluator("style_crossed")
    assert ev.pairs == tuple(style_crossed_pairs()) == tuple(load_pairs(data_path("eval_style_crossed")))
    assert ev.source == "saediff:style_crossed"
