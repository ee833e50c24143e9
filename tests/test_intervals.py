"""Exact numbers of the ratio bootstrap and the bar verdicts (BLOCK-EM's cut, projection shares)."""

from __future__ import annotations

import pytest

from saediff.errors import SaediffError
from saediff.evaluation.intervals import bar_verdict, bootstrap_ratio


def test_a_constant_ratio_has_a_point_interval():
    num = {i: 0.5 * (i + 1) for i in range(10)}
    den = {i: float(i + 1) for i in range(10)}
    r = bootstrap_ratio(num, den, n_boot=200)
    assert r["ratio"] == pytest.approx(0.5) and r["ci"] == pytest.approx([0.5, 0.5]) and r["n"] == 10


def test_the_bootstrap_is_paired_and_seeded():
    num = {"a": 1.0, "b": 0.0, "c": 2.0, "d": 1.0}
    den = {"a": 2.0, "b": 1.0, "c": 2.0, "d": 1.0, "extra": 5.0}  # only shared questions count
    r = bootstrap_ratio(num, den, n_boot=500, seed=3)
    assert r["ratio"] == pytest.approx(4 / 6) and r["n"] == 4
    assert r["ci"][0] < 4 / 6 < r["ci"][1] and r == bootstrap_ratio(num, den, n_boot=500, seed=3)
    # a denominator that is often not positive gives no interval
    r = bootstrap_ratio(
        {i: 1.0 for i in range(6)}, {i: (1.0 if i < 2 else -0.4) for i in range(6)}, n_boot=300
    )
    assert r["ratio"] == pytest.approx(1 / (0.4 / 6)) and r["ci"] is None and r["undefined_share"] > 0.05
    with pytest.raises(SaediffError):
        bootstrap_ratio({"a": 1.0}, {"a": 1.0})


def test_bars_read_the_interval():
    assert bar_verdict([0.55, 0.8], 0.5, ">=") == "holds"
    assert bar_verdict([0.2, 0.45], 0.5, ">=") == "fails"
    assert bar_verdict([0.4, 0.7], 0.5, ">=") == "inconclusive"
    assert bar_verdict([-0.1, 0.15], 0.2, "<=") == "holds"
    assert bar_verdict([0.25, 0.4], 0.2, "<=") == "fails"
    assert bar_verdict(None, 0.2, "<=") == "inconclusive"
    with pytest.raises(SaediffError):
        bar_verdict([0, 1], 0.5, ">")


def test_ablation_shift_figures_on_hand_set_scores():
    from saediff.interventions.ablation_shift import shift_figures

    ft = {"a": 1.0, "b": 2.0, "c": 3.0}
    base = {"a": 0.0, "b": 0.0, "c": 1.0}
    ft_abl = {"a": 0.5, "b": 0.5, "c": 1.0}
    base_abl = {"a": 0.0, "b": 0.5, "c": 0.5}  # the ablation moves the base model too
    f = shift_figures(ft, base, ft_abl, base_abl)
    # shift 1, 2, 2 (mean 5/3); surviving 0.5, 0, 0.5 (mean 1/3); removed 0.5, 2, 1.5 (mean 4/3)
    assert f["shift"] == pytest.approx(5 / 3) and f["surviving"] == pytest.approx(1 / 3)
    assert f["removed"] == pytest.approx(4 / 3) and f["surviving_share"] == pytest.approx(1 / 5)
    assert f["n"] == 3 and f["removed_ci"][0] < 4 / 3 < f["removed_ci"][1]
