"""Exact numbers of the steering protocol's statistics and its cost: the empirical p-value, the
null's quantiles, the verdict rule, the paired effect, the KL per token, the scale search, and the
covariance-matched null directions, each on hand-set inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saediff.errors import SaediffError
from saediff.interventions.steer_cost import kl_per_token, scale_for_cost
from saediff.interventions.steer_null import (
    NullConfig,
    covariance_matched,
    empirical_p,
    isotropic,
    null_quantiles,
    verdict,
)
from saediff.interventions.steer_protocol import CostConfig, item_scores, paired_effect


def test_empirical_p_counts_nulls_at_or_above_plus_one():
    null = [0.1, 0.2, 0.3, 0.4]
    assert empirical_p(0.5, null) == pytest.approx(1 / 5)
    assert empirical_p(0.3, null) == pytest.approx(3 / 5)  # ties count against the candidate
    assert empirical_p(-1.0, null) == pytest.approx(1.0)
    assert empirical_p(9.0, [0.0] * 20) == pytest.approx(1 / 21)  # 20 nulls: the smallest p is 0.048
    with pytest.raises(SaediffError):
        empirical_p(0.1, [])


def test_null_quantiles_interpolate_linearly():
    q = null_quantiles([0.0, 1.0, 2.0, 3.0, 4.0])
    assert q == {"q05": pytest.approx(0.2), "q25": 1.0, "q50": 2.0, "q75": 3.0, "q95": pytest.approx(3.8)}


def test_verdict_reads_the_interval_not_the_point():
    assert verdict([0.1, 0.5], 0.04, 0.2) == "holds"
    assert verdict([-0.1, 0.5], 0.04, 0.2) == "inconclusive"  # beats the null but its interval touches 0
    assert verdict([0.1, 0.5], 0.2, 0.2) == "inconclusive"  # p above alpha, interval reaches past q95
    assert verdict([-0.3, 0.15], 0.5, 0.2) == "fails"  # the whole interval at or below the null's q95
    assert verdict(None, 0.01, 0.2) == "inconclusive"


def test_paired_effect_is_a_paired_t_interval():
    r = paired_effect([1.0, 2.0, 3.0])
    half = 4.3027 * 1.0 / math.sqrt(3)  # t(0.975, 2) x sd 1 / sqrt(3)
    assert r["effect"] == 2.0 and r["n"] == 3
    assert r["effect_ci"] == pytest.approx([2.0 - half, 2.0 + half], abs=1e-3)
    assert paired_effect([0.5])["effect_ci"] is None


def test_item_scores_prefer_continuous_scores():
    assert item_scores({"scores": {"a": 0.25}, "per_question": {"a": 1.0}}) == {"a": 0.25}
    assert item_scores({"per_question": {1: 1.0}}) == {"1": 1.0}
    with pytest.raises(SaediffError):
        item_scores({"em_rate": 0.1})


def test_kl_per_token_on_hand_set_distributions():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    want = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    assert kl_per_token(p, q) == pytest.approx(want, rel=1e-6)
    assert kl_per_token(p, p) == 0.0


def test_scale_search_finds_the_scale_of_a_given_cost():
    calls = []

    def kl(s):  # KL of a quadratic-then-faster law
        calls.append(s)
        return 0.3 * s**2 + 0.01 * s**4

    s, k, ok = scale_for_cost(kl, 0.1, start=2.0)
    assert ok and abs(k / 0.1 - 1) <= 0.05 and kl(s) == k and len(calls) <= 6
    pts: dict = {}
    s1, _, _ = scale_for_cost(kl, 0.05, start=2.0, points=pts)
    n = len(pts)
    s2, k2, ok2 = scale_for_cost(kl, 0.05, start=2.0, points=pts)
    assert (s2, ok2) == (s1, True) and len(pts) == n  # measured points are reused
    # a direction whose cost saturates below the target: the closest scale, flagged
    s, k, ok = scale_for_cost(lambda s: 0.01 * (1 - math.exp(-s)), 0.1, start=1.0)
    assert not ok and k < 0.1


def test_covariance_matched_directions_lie_in_the_span_of_the_centred_residuals():
    acts = torch.tensor([[1.0, 0.0, 5.0], [3.0, 0.0, 5.0], [2.0, 0.0, 5.0]])  # varies along x only
    for d in covariance_matched(acts, 3, seed=4):
        assert d.kind == "covariance" and d.vector.norm() == pytest.approx(1.0)
        assert abs(float(d.vector[0])) == pytest.approx(1.0, abs=1e-6)  # the mean (z = 5) is removed
    seeds = [d.seed for d in covariance_matched(acts, 3, seed=4)]
    assert seeds == [4, 5, 6]
    iso = isotropic(8, 3, seed=10)
    assert [d.seed for d in iso] == [10, 11, 12] and all(d.vector.norm() == pytest.approx(1.0) for d in iso)
    again = isotropic(8, 3, seed=10)
    assert all(torch.equal(a.vector, b.vector) for a, b in zip(iso, again))  # reproducible from the seed
    assert float(np.abs(np.corrcoef(torch.stack([d.vector for d in iso]).numpy())[0, 1])) < 1.0


def test_configs_refuse_what_cannot_work():
    with pytest.raises(SaediffError):
        NullConfig(n_isotropic=0, n_covariance=0)
    with pytest.raises(SaediffError):
        NullConfig(alpha=1.5)
    with pytest.raises(SaediffError):
        CostConfig(neutral=None, budget=0.0)  # type: ignore[arg-type]
    with pytest.raises(SaediffError):
        CostConfig(neutral=None, levels=(0.5, 2.0))  # type: ignore[arg-type]


def test_permuted_estimates_lose_their_component_along_the_candidate(tmp_path):
    """A label-permuted estimate that leans on the candidate keeps only its label-free part; one that is
    the candidate itself is dropped (a null that holds the candidate tests nothing)."""
    from saediff.interventions.steer_protocol import _Protocol

    u = torch.tensor([1.0, 0.0, 0.0])
    estimates = {0: torch.tensor([3.0, 4.0, 0.0]), 1: torch.tensor([-2.0, 0.0, 0.0])}
    nc = NullConfig(n_permuted=2, seed=0)
    run = _Protocol([], 0, 1.0, None, None, tmp_path, None, nc, {"c": lambda seed: estimates[seed - 200_000]})
    nulls = run.permuted_null("c", u)
    assert len(nulls) == 1 and nulls[0].seed == 200_000 and nulls[0].kind == "permuted"
    assert torch.allclose(nulls[0].vector, torch.tensor([0.0, 1.0, 0.0]))
    assert run._leak[nulls[0].name] == pytest.approx(0.6)  # cos of (3, 4, 0) with the candidate
