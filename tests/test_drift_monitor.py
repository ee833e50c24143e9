"""The drift monitor's statistics on hand-set residuals: exact numbers along the direction and the
norm-matched random directions, the per-step calibrated alert that a shared first step does not
trip, and the sweep's alert precision and recall."""

from __future__ import annotations

import math

import pytest
import torch

from saediff.interventions.monitor import DriftMonitor, calibrate_rate, calibrate_rates


def _monitor(directions, mask, **kw):
    ids = torch.zeros(mask.shape, dtype=torch.long)
    return DriftMonitor(torch.nn.Linear(1, 1), ids, mask, 0, directions, **kw)


def test_projection_shift_and_random_directions_exact_on_hand_set_residuals():
    """Two prompts, d 2, direction 3 e0; prompt 0 reads both tokens, prompt 1 only its first (the
    100s are masked out). After step 0 prompt 0 moved +1 along e0, prompt 1 +2: paired changes 1, 2,
    mean 1.5, t = 1.5 / (sd 0.7071 / sqrt 2) = 3. Each random direction r_k reads the same masked
    means: its shift is mean_n(x_n . r_k) since the start."""
    mask = torch.tensor([[True, True], [True, False]])
    mon = _monitor(torch.tensor([[3.0, 0.0]]), mask, n_random=4, seed=1)
    before = torch.zeros(2, 2, 2)
    after = torch.tensor([[[1.0, 0.0], [1.0, 2.0]], [[2.0, -1.0], [100.0, 100.0]]])  # (N, T, D)
    mon.observe(-1, before)
    mon.observe(0, after)
    h = mon.history
    assert h.steps == [0, 1] and h.projection == pytest.approx([0.0, 1.5])
    assert h.rate == pytest.approx([0.0, 1.5]) and h.t_stat == pytest.approx([0.0, 3.0])
    assert h.shift == pytest.approx([0.0, 1.5])
    # masked means per prompt: (1, 1) and (2, -1); their mean (1.5, 0)
    assert mon.R.norm(dim=-1) == pytest.approx(torch.ones(4))  # norm of the (one) unit direction
    expected = (torch.tensor([1.5, 0.0]) @ mon.R.T).tolist()
    assert h.random_shift[0] == pytest.approx([0.0] * 4) and h.random_shift[1] == pytest.approx(expected)
    assert h.random_rate[1] == pytest.approx(expected)
    vr = h.versus_random()
    mags = [abs(x) for x in expected]
    assert vr["value"] == pytest.approx(1.5) and vr["random_abs_max"] == pytest.approx(max(mags))
    assert vr["share_below"] == sum(m < 1.5 for m in mags) / 4 and vr["beats_random"] == (1.5 > max(mags))
    # seeded: the same random directions again; two directions: random ones of norm |mean(e0, e1)|
    assert torch.equal(_monitor(torch.tensor([[3.0, 0.0]]), mask, n_random=4, seed=1).R, mon.R)
    two = _monitor(torch.eye(2), mask, n_random=3)
    assert two.R.norm(dim=-1) == pytest.approx(torch.full((3,), 1 / math.sqrt(2)))


def test_calibrate_rates_per_step_with_a_floor():
    control = {"steps": [0, 1, 2, 4, 8], "rate": [0.0, 1.0, 0.5, 0.02, float("nan")]}
    assert calibrate_rate(control) == pytest.approx(1.5)
    # 1.5 x the control's rate at each step, floored at 1.5 x 0.1 x its fastest (0.15)
    assert calibrate_rates(control) == pytest.approx({1: 1.5, 2: 0.75, 4: 0.15, 8: 0.15})


CONTROL_RATES = [1.0, 0.5, 0.2, 0.1]  # at steps 1, 2, 4, 8: the first optimizer steps move most
CHECKS = [0, 1, 3, 7]  # 0-based steps after which the monitor reads: history steps 1, 2, 4, 8


def _run(rates: list[float], **kw):
    """A monitor fed residuals whose projection on e0 moves at ``rates`` per step between checks
    (prompt n by rate x (1 + 0.05 (n - 3.5)), so the paired t is finite and large)."""
    mon = _monitor(torch.tensor([[1.0, 0.0]]), torch.ones(8, 1, dtype=torch.bool), **kw)
    spread = 1 + 0.05 * (torch.arange(8.0) - 3.5)  # mean 1
    x, prev = torch.zeros(8), -1
    mon.observe(-1, torch.zeros(8, 1, 2))
    for step, rate in zip(CHECKS, rates):
        x = x + rate * (step - prev) * spread
        prev = step
        mon.observe(step, torch.stack([x, torch.zeros(8)], -1)[:, None, :])
    return mon.history


def test_alert_needs_the_run_past_the_control_at_the_same_step_twice():
    """A blocked fine-tune's first step is the plain one's (the penalty is 0 at the base weights):
    both move 2.0 along the direction at step 1, past 1.5 x the control's 1.0. The blocked one then
    stands still and never alerts; the plain one keeps moving faster than the control at each step
    and alerts at step 2 (under the old single-check rule both alerted at step 1, and the plain
    one's step-2 rate 1.0 is below the control's fastest 1.5, so a global threshold confirmed
    would miss it). A run that moves like the control, a little faster at every step, stays quiet."""
    control = _run(CONTROL_RATES, confirm=1)
    thresholds = calibrate_rates(control)
    assert thresholds == pytest.approx({1: 1.5, 2: 0.75, 4: 0.3, 8: 0.15})
    kw = {"rate_threshold": calibrate_rate(control), "rate_thresholds": thresholds}
    assert _run([2.0, 0.0, 0.0, 0.0], **kw).alert_step is None  # blocked
    plain = _run([2.0, 1.0, 0.5, 0.3], **kw)
    assert plain.alert_step == 2 and min(plain.t_stat[1:]) > 5
    assert _run([1.2 * r for r in CONTROL_RATES], **kw).alert_step is None
    assert _run([2.0, 0.0, 0.0, 0.0], **kw, confirm=1).alert_step == 1  # the old rule: one check suffices
    assert (
        _run([2.0, 1.0, 0.5, 0.3], rate_threshold=1.5).alert_step is None
    )  # one global threshold, confirmed
    with pytest.raises(ValueError, match="confirm must be at least 1"):
        _run([1.0], confirm=0)


def test_monitor_report_precision_and_recall_over_a_sweep():
    from saediff.interventions.sweep_monitor import monitor_report

    def run(alert, em):
        return {"drift_alert_step": alert, **({"em": {"em_rate": em}} if em is not None else {})}

    runs = {
        "control": run(None, 0.0),
        "control_heldout": run(None, 0.01),
        "control_benign": run(4, 0.02),
        "plain": run(2, 0.6),
        "penalty_lam10000": run(1, 0.012),
        "penalty_lam10000_random": run(8, 0.55),
        "penalty_lam100": run(None, 0.3),
        "unjudged": run(2, None),
        "unmonitored": {"em": {"em_rate": 0.9}},
    }
    rep = monitor_report(runs)
    assert set(rep["runs"]) == {
        "control_heldout",
        "control_benign",
        "plain",
        "penalty_lam10000",
        "penalty_lam10000_random",
        "penalty_lam100",
        "unjudged",
    }
    assert rep["runs"]["penalty_lam10000"] == {"alert_step": 1, "em_rate": 0.012, "em_above_0.1": False}
    # alerts: control_benign, plain, penalty, random (4); followed by EM > 0.1: plain, random (2)
    assert (rep["n_alerts"], rep["n_alerts_followed_by_em"], rep["precision"]) == (4, 2, 0.5)
    # EM > 0.1: plain, random, penalty_lam100 (3); of them alerted: 2
    assert (rep["n_em"], rep["n_em_alerted"], rep["recall"]) == (3, 2, pytest.approx(2 / 3))
    assert monitor_report({"plain": run(None, 0.0)})["precision"] is None
