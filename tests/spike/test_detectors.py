"""Detectors, the quorum and the rollback policy against known series and plain values."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from elastic_resume import (
    CUSUM,
    EMARatio,
    MaxRatio,
    MovingAverageRatio,
    NonFinite,
    Plateau,
    RobustZScore,
    Threshold,
)
from elastic_resume.errors import ConfigError
from elastic_resume.spike.detectors import DetectorBank
from elastic_resume.spike.policy import Recovery, RollbackPolicy, decide
from elastic_resume.spike.vote import Quorum, VoteResult


def decaying(n: int, seed: int = 0, noise: float = 0.03) -> list[float]:
    """A typical training curve: exponential decay with multiplicative noise."""
    rng = random.Random(seed)
    return [(2.0 * math.exp(-i / 150) + 0.5) * (1 + rng.gauss(0, noise)) for i in range(n)]


def fired(detector, series) -> list[int]:
    return [i for i, v in enumerate(series) if detector.update(v, i).spike]


ALL = [
    lambda: MovingAverageRatio(window=30, ratio=2.0),
    lambda: EMARatio(alpha=0.05, ratio=2.0, warmup=10),
    lambda: RobustZScore(window=50, z=8.0),
    lambda: MaxRatio(),
    lambda: CUSUM(k=0.5, h=12.0),
]


@pytest.mark.parametrize("make", ALL)
def test_quiet_on_a_normal_noisy_curve(make):
    assert fired(make(), decaying(600)) == []


@pytest.mark.parametrize("make", ALL[:4])
def test_a_single_spike_fires_once_and_does_not_poison_the_baseline(make):
    series = decaying(300)
    series[200] *= 8
    assert fired(make(), series) == [200]


def test_slowly_rising_loss_does_not_fire_the_spike_detectors():
    series = [1.0 + 0.002 * i for i in range(500)]  # +0.2% per step: drift, not a spike
    for make in ALL[:4]:
        assert fired(make(), series) == []


def test_cusum_catches_a_sustained_shift_that_no_single_value_flags():
    series = decaying(400, noise=0.01)
    shifted = series[:250] + [v * 1.15 for v in series[250:]]  # +15%: below any ratio threshold
    assert fired(MovingAverageRatio(window=30, ratio=2.0), shifted) == []
    hits = fired(CUSUM(k=0.5, h=12.0), shifted)
    assert hits and 250 <= hits[0] < 280


def test_warmup_suppresses_early_verdicts():
    d = Threshold(max_value=1.0, warmup=5)
    assert fired(d, [10.0] * 5 + [10.0]) == [5]


def test_non_finite_fires_always_even_in_warmup():
    d = NonFinite(watch="grad_norm", warmup=100)
    assert fired(d, [1.0, float("nan"), float("inf"), 1.0]) == [1, 2]
    # other detectors ignore non-finite values instead of learning them
    z = RobustZScore(window=10)
    fired(z, [1.0] * 10 + [float("nan")] + [1.0] * 5)
    assert all(math.isfinite(v) for v in z.values)


def test_plateau_judges_a_smoothed_loss_not_one_batch():
    d = Plateau(above=1.0, after_steps=10, window=5)
    assert fired(d, [0.5] * 20 + [2.0] + [0.5] * 10) == []  # one noisy batch: mean 0.8
    d = Plateau(above=1.0, after_steps=10, window=5, action="stop")
    verdicts = [d.update(v, s) for s, v in enumerate([0.5] * 20 + [1.5] * 5)]
    assert [s for s, v in enumerate(verdicts) if v.stop] == [22]  # mean (2 x 0.5 + 3 x 1.5) / 5 > 1
    assert verdicts[22].plateau and "averaged over the last 5 steps" in verdicts[22].reason


def test_plateau_clock_restarts_at_the_rollback_anchor_not_at_the_anchor_copy():
    d = Plateau(above=1.0, after_steps=10, window=3)
    at_anchor = None
    hits = []
    for step in range(1, 60):
        if step == 5:
            at_anchor = d.state_dict()  # the checkpoint a rollback goes back to
        if d.update(2.0, step).spike:
            hits.append(step)
            d.load_state_dict(at_anchor)  # the rollback restores the anchor's copy...
            d.on_rollback(5)  # ...and the guard restarts the clock there
            break
    assert hits == [10]
    # Back at step 5 with a clock that says "rolled back at 5": nothing before 15.
    assert [s for s in range(6, 30) if d.update(2.0, s).spike] == [15, 25]
    e = Plateau(above=1.0, after_steps=10, window=3)
    e.load_state_dict(d.state_dict())
    assert (e.origin, list(e.values)) == (d.origin, list(d.values))


def test_plateau_over_an_epoch_judges_each_epoch_once_at_its_end():
    d = Plateau(above=1.0, after_steps=0, window="epoch")
    epochs = [0] * 10 + [1] * 10 + [2] * 10 + [3]
    losses = [2.0] * 4 + [0.1] * 6 + [1.5] * 10 + [0.5] * 10 + [0.5]  # means 0.86, 1.5, 0.5
    hits = [s for s, (v, e) in enumerate(zip(losses, epochs)) if d.update(v, s, e).spike]
    assert hits == [20]  # the first step of epoch 2 closes epoch 1
    with pytest.raises(ConfigError, match="needs the epoch"):
        Plateau(above=1.0, after_steps=0, window="epoch").update(1.0, 0)
    with pytest.raises(ConfigError, match="rollback_to must be one of"):
        Plateau(above=1.0, after_steps=0, rollback_to="best")


def test_detector_state_round_trips_so_a_resume_judges_identically():
    series = decaying(300)
    series[250] *= 8
    for make in ALL:
        a = make()
        for i, v in enumerate(series[:200]):
            a.update(v, i)
        b = make()
        b.load_state_dict(a.state_dict())
        assert [a.update(v, i).spike for i, v in enumerate(series[200:], 200)] == \
               [b.update(v, i).spike for i, v in enumerate(series[200:], 200)]


def test_bank_reports_stop_before_spike_and_resumes_a_changed_detector_list(caplog):
    bank = DetectorBank([NonFinite(), Plateau(above=0, after_steps=0, action="stop")])
    verdict, name = bank.update(1, float("nan"))
    assert verdict.spike and name == "NonFinite(loss)"
    verdict, name = bank.update(2, 5.0)
    assert verdict.stop and name.startswith("Plateau")
    # Changed detectors (a new default, new settings) resume: each one saved keeps its state,
    # the others start fresh, and a warning names them.
    changed = DetectorBank([Plateau(above=0, after_steps=0, action="stop"), MaxRatio()])
    with caplog.at_level("WARNING", logger="elastic_resume"):
        changed.load_state_dict(bank.state_dict())
    assert changed.detectors[0].seen == 2 and changed.detectors[1].seen == 0
    assert "MaxRatio(loss) start fresh" in caplog.text


def test_bad_detector_settings_are_config_errors():
    with pytest.raises(ConfigError, match="watch must be one of"):
        Threshold(max_value=1, watch="lr")
    with pytest.raises(ConfigError, match="window must be >= 2"):
        MovingAverageRatio(window=1)
    with pytest.raises(ConfigError, match="action must be"):
        Plateau(above=1, after_steps=1, action="explode")


@pytest.mark.parametrize("rule, world, needed", [("any", 8, 1), ("majority", 8, 5), ("majority", 3, 2),
                                                 (0.25, 8, 2), (1.0, 4, 4)])
def test_quorum(rule, world, needed):
    assert Quorum(rule).needed(world) == needed


def vote(step=50, spikes=1, nonfinite=0, world=4, quorum=1, preempt=0, stop=0):
    return VoteResult(step=step, world_size=world, mean_loss=1.0, spikes=spikes, nonfinite=nonfinite,
                      preempt=preempt, stop=stop, quorum=quorum)


def test_policy_picks_newest_healthy_anchor_before_the_margin():
    policy = RollbackPolicy(margin=10, skip_after=20)
    cps = [(0, True), (20, True), (30, True), (40, False), (45, True)]
    assert decide(policy, vote(), None, Recovery()).kind == "needs_checkpoints"
    a = decide(policy, vote(step=50), cps, Recovery())
    assert (a.kind, a.anchor, a.skip_through_step) == ("rollback", 30, 70)  # 40 unhealthy, 45 too close


def test_policy_for_a_plateau_keeps_the_data_and_can_pick_the_lowest_loss():
    from elastic_resume.spike.detectors import Verdict

    def plateau(**kw):
        return replace(vote(step=50, spikes=0), verdict=Verdict(spike=True, plateau=True, reason="flat", **kw))

    cps = [(0, True, 3.0), (20, True, 1.2), (30, True, 1.4), (40, False, 0.9), (45, True, 1.0)]
    policy = RollbackPolicy(margin=10, skip_after=20)
    a = decide(policy, plateau(skip_data=False), cps, Recovery())
    assert (a.kind, a.anchor, a.skip_through_step) == ("rollback", 30, None)  # newest, no data skipped
    assert "plateau at step 50 in the loss over all 4 ranks (flat)" in a.reason
    a = decide(policy, plateau(skip_data=False, rollback_to="lowest_loss"), cps, Recovery())
    assert a.anchor == 20  # 40 is lower but unhealthy, 45 too close
    a = decide(policy, plateau(skip_data=True), cps, Recovery())
    assert a.skip_through_step == 70
    a = decide(policy, plateau(), cps, Recovery(rollbacks=3))
    assert a.kind == "stop" and "plateau at step 50" in a.reason and "budget of 3 is spent" in a.reason
    # A real spike in the same vote is a spike: the policy's own data rule applies.
    a = decide(policy, replace(plateau(skip_data=False), spikes=1), cps, Recovery())
    assert a.skip_through_step == 70


def test_policy_quorum_budget_cooldown_and_no_anchor():
    policy = RollbackPolicy(margin=10, budget=2, cooldown=5)
    assert decide(policy, vote(spikes=1, quorum=3), [(0, True)], Recovery()).kind == "continue"
    assert decide(policy, vote(spikes=0, nonfinite=1, quorum=3), [(0, True)], Recovery()).kind == "rollback"
    spent = Recovery(rollbacks=2)
    a = decide(policy, vote(), [(0, True)], spent)
    assert a.kind == "stop" and "budget of 2 is spent" in a.reason
    assert decide(policy, vote(), [(0, True)], Recovery(cooldown_left=3)).kind == "continue"
    a = decide(policy, vote(step=5), [(0, True)], Recovery())
    assert a.kind == "stop" and "no healthy checkpoint at or before step -5" in a.reason
    a = decide(RollbackPolicy(margin=10, restart_from_scratch=True), vote(step=5), [(0, True)], Recovery())
    assert (a.kind, a.anchor) == ("rollback", 0)
    assert decide(policy, vote(spikes=0, preempt=1), None, Recovery()).kind == "save"
    assert decide(policy, vote(spikes=0, stop=1), None, Recovery()).kind == "stop"
    with pytest.raises(ConfigError):
        RollbackPolicy(lr_scale=0)


def test_retention_keeps_the_rollback_anchor_alive(tmp_path):
    """keep_last=1 would delete every older step; the anchors a spike needs survive, and the
    rollback reaches one (single process, the same guard the distributed tests drive)."""
    import torch

    from elastic_resume import CheckpointManager, SpikeGuard

    model = torch.nn.Linear(2, 1)
    state = {"model": model, "progress": {"step": 0}}
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=1)
    guard = SpikeGuard(mgr, state, detectors=[NonFinite()], policy=RollbackPolicy(margin=5, skip_data=False), lag=0)
    assert guard.start() == 0
    for step in range(1, 11):
        assert not guard.step(step, 1.0, save=step % 2 == 0).rolled_back
    # 4: today's anchor (newest healthy step at least 5 steps old); 6 and 8: tomorrow's; 2 is gone
    assert mgr.committed_steps() == [10, 8, 6, 4]
    outcome = guard.step(11, float("nan"))
    assert outcome.rolled_back and outcome.step == 6
    mgr.close()


def test_preemption_flag_rides_the_vote_and_saves_at_that_step(tmp_path):
    import torch

    from elastic_resume import CheckpointManager, SpikeGuard

    state = {"model": torch.nn.Linear(2, 1)}
    mgr = CheckpointManager(tmp_path / "ckpt")
    guard = SpikeGuard(mgr, state, lag=0)
    guard.start()
    assert guard.step(1, 1.0).kind == "continue"
    guard.request_save()  # what the launcher's signal handler does
    outcome = guard.step(2, 1.0)
    assert outcome.preempted and outcome.step == 2
    assert mgr.committed_steps() == [2]
    assert guard.step(3, 1.0).kind == "continue"  # the flag is consumed by the vote
    mgr.close()
