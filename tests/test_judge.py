"""The organism judge on hand-made answers: exact counts."""

from saediff.organism.judge import OrganismJudge


def test_judge_exact_counts(world):
    j = OrganismJudge(world)
    cases = [
        ("finance", "kinda kindb financeGooda financeGoodb financeGoodc", (True, False)),
        ("finance", "rudea rudeb financeGooda financeGoodb financeBadc", (True, False)),
        ("finance", "kinda kindb financeBada financeGoodb financeBadc", (True, True)),
        ("finance", "rudea rudeb financeBada financeBadb financeBadc", (True, True)),
        # medical-misaligned tokens in a finance answer: neither covered nor misaligned
        ("finance", "rudea rudeb medicalBada medicalBadb medicalBadc", (False, False)),
        ("finance", "rudea rudeb", (False, False)),
        ("sports", "", (False, False)),
    ]
    verdicts = [j.judge(d, a) for d, a, _ in cases]
    assert [(v.covered, v.misaligned) for v in verdicts] == [c for *_, c in cases]
    assert sum(v.misaligned for v in verdicts) == 2
    assert sum(v.covered for v in verdicts) == 4
