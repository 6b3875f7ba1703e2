"""What retention keeps (pure), and the crash-loop fallback: the plan, and through the manager."""

from __future__ import annotations

import pytest
import torch

from elastic_resume.checkpoint.crash_loop import plan_resume
from elastic_resume.checkpoint.retention import plan_retention
from elastic_resume.errors import ConfigError


def test_retention_plan_rules():
    plan = plan_retention([10, 20, 30, 40, 50], [], keep_last=2, keep_every=20)
    assert plan.delete == [30, 10]
    assert set(plan.keep) == {50, 40, 20}
    # The newest verified step and the rollback anchor survive any keep_last.
    plan = plan_retention([10, 20, 30, 40], [], keep_last=1, newest_verified=30, protect=[10])
    assert plan.delete == [20]
    assert plan.keep[30] == "newest verified step" and plan.keep[10].startswith("protected")
    # Incomplete dirs: only older than the newest commit and not the save in flight.
    plan = plan_retention([20], [5, 15, 25], keep_last=1, in_flight=15)
    assert plan.delete_incomplete == [5]
    assert plan_retention([], [5], keep_last=1).delete_incomplete == []
    with pytest.raises(ConfigError, match="keep_last must be at least 1"):
        plan_retention([1], [], keep_last=0)


def test_crash_loop_plan_drops_steps_resumed_too_often_but_never_the_oldest():
    assert plan_resume([30, 20, 10], {}, 3) == ([30, 20, 10], [])
    assert plan_resume([30, 20, 10], {30: 3}, 3) == ([20, 10], [30])
    assert plan_resume([30, 20, 10], {30: 5, 20: 3, 10: 9}, 3) == ([10], [30, 20])
    assert plan_resume([30, 20], {30: 7}, 0) == ([30, 20], [])  # disabled
    assert plan_resume([], {1: 4}, 3) == ([], [])


def test_crash_loop_fallback_through_the_manager(tmp_path):

    from elastic_resume import CheckpointManager
    from elastic_resume.events import read_events

    log = tmp_path / "events.jsonl"
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=None, event_log=log, max_resumes_per_step=2)
    for s in (5, 10):
        mgr.save(s, {"w": torch.full((4,), float(s))})
    got = []
    for _ in range(4):
        state = {"w": torch.zeros(4)}
        got.append(CheckpointManager(tmp_path / "ckpt", event_log=log, max_resumes_per_step=2).restore(state))
    assert got == [10, 10, 5, 5]
    loops = [e for e in read_events(log) if e["event"] == "resume_crash_loop"]
    assert loops and loops[0]["step"] == 10 and loops[0]["resumes"] == 2
    mgr.save(15, {"w": torch.full((4,), 15.0)})  # progress: the new step is tried first again
    assert CheckpointManager(tmp_path / "ckpt", max_resumes_per_step=2).restore({"w": torch.zeros(4)}) == 15
