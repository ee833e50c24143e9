"""The shipped English EM data (issue 23 item 2): sizes, pairing, register-matched lengths, no
evaluation question among the training ones, and a held-out third of every domain."""

from __future__ import annotations

import json
import statistics

from saediff.data.chat_data import load_chat_jsonl
from saediff.data.em_data import FILES, data_path, heldout_ids, medical_pairs, offdomain_pairs


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
