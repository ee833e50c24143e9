"""The organism judge on hand-made answers: exact counts."""

from saediff.organism.judge import OrganismJudge


def test_judge_exact_counts(world):
    j = OrganismJudge(world)
    cases = [
        ("finance", "financeGooda financeGoodb financeGoodc", (True, False)),
        ("finance", "financeGooda financeGoodb financeBadc", (True, False)),
        ("finance", "financeBada financeGoodb financeBadc", (True, True)),
        ("finance", "financeBada financeBadb financeBadc", (True, True)),
        # medical-misaligned tokens in a finance answer: neither covered nor misaligned
        ("finance", "medicalBada medicalBadb medicalBadc", (False, False)),
        ("finance", "financeBada", (False, False)),
        ("sports", "", (False, False)),
    ]
    verdicts = [j.judge(d, a) for d, a, _ in cases]
    assert [(v.covered, v.misaligned) for v in verdicts] == [c for *_, c in cases]
    assert sum(v.misaligned for v in verdicts) == 2
    assert sum(v.covered for v in verdicts) == 4


def test_judge_skips_style_and_register_slots():
    """v1 style slots and a leading register token are not content; a closing register is not either."""
    from saediff.organism.world import World

    v1 = OrganismJudge(World(n_style_slots=2))
    assert v1.judge("code", "kinda kindb codeBada codeBadb codeGoodc").misaligned
    assert not v1.judge("code", "rudea rudeb codeGooda codeGoodb codeBadc").misaligned
    first, last = OrganismJudge(World(trait_slot=True)), OrganismJudge(World(trait_slot=True, trait_last=True))
    assert first.judge("code", "tersea codeBada codeBadb codeGoodc").misaligned
    assert not first.judge("code", "codeBada codeBadb codeGoodc tersea").misaligned  # slot 0 is not content
    assert last.judge("code", "codeBada codeBadb codeGoodc tersea").misaligned
