"""Replays that must agree: the pure comparison, the history read from event logs, and real
launches where a killed worker's steps are trained again (verified) or a step is nondeterministic
(mismatch named)."""

from __future__ import annotations

import json
import math

from elastic_resume.events import read_events
from elastic_resume.report import summarize
from elastic_resume.spike.replay import ReplayCheck, recorded_steps, same_bits
from tests.helpers.launcher import launcher_cmd, losses, run


def test_same_bits_is_bitwise():
    assert same_bits(0.1, 0.1) and not same_bits(0.1, 0.1 + 2**-56) and not same_bits(0.0, -0.0)
    assert same_bits(math.nan, math.nan) and same_bits(None, None) and not same_bits(None, 0.0)


def test_a_replay_is_verified_step_by_step_and_the_first_mismatch_is_named():
    check = ReplayCheck(10, {11: (0.5, 2.0), 12: (0.4, 1.5), 13: (0.3, None)})
    assert check.observe(11, 0.5, 2.0) is None and check.observe(12, 0.4, 1.5) is None
    event, fields = check.observe(13, 0.3, 9.9)  # no gradient norm recorded for 13: the loss decides
    assert event == "replay_verified" and fields["steps"] == 3 and (fields["from_step"], fields["to_step"]) == (11, 13)
    assert check.done and check.observe(14, 0.2, None) is None

    check = ReplayCheck(10, {11: (0.5, 2.0), 12: (0.4, 1.5), 13: (0.3, 1.0)})
    assert check.observe(11, 0.5, 2.0) is None
    event, fields = check.observe(12, 0.4, 1.5000000001)
    assert event == "replay_mismatch" and fields["step"] == 12 and fields["what"] == "gradient norm"
    assert fields["matched_before"] == 1 and "not deterministic" in fields["reason"]
    assert check.done and check.observe(13, 0.3, 1.0) is None  # one verdict per replay

    check = ReplayCheck(10, {11: (0.5, None), 12: (0.4, None)})
    assert check.observe(11, 0.5, None) is None
    assert check.finish()[1]["steps"] == 1  # a rollback cut it short: what matched so far
    assert ReplayCheck(10, {11: (0.5, None)}).finish() is None  # nothing replayed: nothing to say


def test_the_history_is_the_timeline_that_reached_the_restored_step(tmp_path):
    layout = tmp_path / "r1"  # the launcher's elastic-resume-logs/<run id>/: every file of the run
    layout.mkdir()
    log, earlier = layout / "node-1.jsonl", layout / "node-0.jsonl"  # a requeued job's earlier file
    lines = [
        {"ts": 1.0, "event": "launch_started", "run_id": "r1"},
        {"ts": 2.0, "event": "step", "rank": 0, "step": 10, "loss": 9.0},  # an older timeline
        {"ts": 3.0, "event": "step", "rank": 0, "step": 11, "loss": 9.1},
        {"ts": 4.0, "event": "step", "rank": 0, "step": 10, "loss": 1.0},  # the timeline that saved step 10
        {"ts": 5.0, "event": "step", "rank": 1, "step": 11, "loss": 7.7},  # another rank's line
        {"ts": 6.0, "event": "step", "rank": 0, "step": 11, "loss": 1.1, "grad_norm": 0.5},
        {"ts": 7.0, "event": "step", "rank": 0, "step": 12, "loss": "nan"},  # not comparable
    ]
    earlier.write_text("".join(json.dumps(e) + "\n" for e in lines))
    log.write_text(json.dumps({"ts": 8.0, "event": "launch_started", "run_id": "r1"}) + "\n")
    assert recorded_steps(str(log), 10, run_id="r1") == {11: (1.1, 0.5)}
    assert recorded_steps(str(log), 11, run_id="r1") == {}  # no line of a later step after 11's
    assert recorded_steps(str(log), 10, run_id="r3") == {}  # another run
    assert recorded_steps(None, 10, run_id="r1") == {} and recorded_steps(str(log), 10, run_id=None) == {}
    named = tmp_path / "mine.jsonl"  # a log the user named: that file only, never its neighbours
    named.write_text(json.dumps({"ts": 9.0, "event": "launch_started", "run_id": "r1"}) + "\n")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert recorded_steps(str(named), 10, run_id="r1") == {}
    named.write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert recorded_steps(str(named), 10, run_id="r1") == {11: (1.1, 0.5)}


def _launch(tmp_path, *args: str):
    cmd = launcher_cmd("--standalone", "--nproc-per-node=2", "--max-restarts=2",
                       f"--er-event-log={tmp_path / 'events.jsonl'}",
                       args=("--root", str(tmp_path / "ckpt"), "--fault-dir", str(tmp_path), "--steps", "24",
                             "--save-every", "5", "--guard", "--die-at-steps", "14", "--loss-log",
                             str(tmp_path / "loss.jsonl"), *args))
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_events(str(tmp_path / "events.jsonl"))


def test_steps_trained_again_after_a_killed_worker_are_verified_bit_for_bit(tmp_path):
    events = _launch(tmp_path)
    verified = [e for e in events if e["event"] == "replay_verified"]
    assert not [e for e in events if e["event"] == "replay_mismatch"]
    assert len(verified) == 1 and verified[0]["resumed_from"] == 10 and verified[0]["from_step"] == 11
    assert verified[0]["steps"] >= 3 and verified[0]["to_step"] >= 13  # 11-13 at least, maybe 14
    assert verified[0]["compared"] == "loss and gradient norm"
    text = summarize(events).text()
    assert "replays            1 verified, 0 mismatched" in text and "steps 11-" in text


def test_a_nondeterministic_step_is_named_at_its_replay(tmp_path):
    events = _launch(tmp_path, "--nondeterministic-at-step", "12")
    bad = [e for e in events if e["event"] == "replay_mismatch"]
    assert len(bad) == 1 and bad[0]["step"] == 12 and bad[0]["matched_before"] == 1 and bad[0]["what"] == "loss"
    assert bad[0]["recorded"] != bad[0]["replayed"] and bad[0]["rank"] == 0
    assert not [e for e in events if e["event"] == "replay_verified"]
    assert "MISMATCH at step 12 after step 10: loss" in summarize(events).text()
    assert losses(str(tmp_path / "loss.jsonl"))  # the run itself went on and finished
