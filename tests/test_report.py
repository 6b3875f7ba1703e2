"""The run report computed from known event sequences, its plot and its command line."""

from __future__ import annotations

import pytest

from elastic_resume.report import summarize


def ev(ts, event, **kw):
    return {"ts": float(ts), "event": event, **kw}


def test_report_keeps_the_surviving_timeline_and_computes_goodput():
    events = [
        ev(0, "launch_started", node="n", pid=1),
        *[ev(1 + s, "step", rank=0, step=s, loss=1.0 / s, seconds=1.0) for s in range(1, 7)],  # steps 1-6
        ev(7.5, "workers_failed", node="n", pid=1, failures=[{"rank": 1, "exitcode": -9, "signal": "SIGKILL"}]),
        ev(8, "restart", node="n", pid=1, failures=[{"rank": 1, "exitcode": -9, "signal": "SIGKILL"}]),
        ev(8.1, "restart", node="m", pid=2, failures=None),  # the other node, same incident
        ev(10, "restored", rank=0, step=4),
        *[ev(10 + s - 4, "step", rank=0, step=s, loss=1.0 / s, seconds=1.0) for s in range(5, 9)],  # 5-8 again
        ev(14.5, "rollback", rank=0, from_step=8, to_step=6, skipped=[100, 140]),
        ev(14.6, "data_skipped", rank=0, through_step=9),
        *[ev(15 + s - 7, "step", rank=0, step=s, loss=0.1, seconds=1.0) for s in range(7, 11)],  # 7-10
        ev(18.5, "save_committed", rank=0, step=10, bytes=2**20, seconds=0.5),
        ev(18.6, "save_committed", rank=1, step=10, bytes=2**20, seconds=0.5),  # same commit, rank 1
        ev(20, "launch_finished", node="n", pid=1, exit_code=0, reason="finished"),
    ]
    s = summarize(events)
    assert s.wall_s == 20.0 and s.sessions == 1
    assert s.steps_final == 10 and s.steps_executed == 14 and s.last_step == 10
    assert s.useful_s == 10.0 and abs(s.goodput - 0.5) < 1e-9
    assert len(s.restarts) == 1 and s.restarts[0]["resumed_from"] == 4
    assert s.restarts[0]["cause"] == "rank 1 killed by SIGKILL" and s.restarts[0]["recover_s"] == 3.5
    assert s.rollbacks[0]["from_step"] == 8 and s.rollbacks[0]["to_step"] == 6
    assert s.saves == 1 and s.save_bytes == 2**20
    assert [seg[0][0] for seg in s.abandoned] == [5, 7]  # the thrown-away pieces of the curve
    text = s.text()
    assert "goodput            50.0%" in text and "spike at step 8 -> back to step 6" in text


def test_report_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from elastic_resume.report import plot

    events = [ev(s, "step", rank=0, step=s, loss=1.0 / s, seconds=0.5) for s in range(1, 20)]
    events.append(ev(9.5, "rollback", rank=0, from_step=9, to_step=5, skipped=None))
    out = tmp_path / "loss.png"
    plot(events, summarize(events), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What the loss does not show goes on the same timeline: a hang, replicas that differed and the
    # rollback they caused, a verified replay and a mismatched one.
    events += [ev(20, "hang_detected", rank=1, host="h", section="data", step=12, seconds=60.0),
               ev(21, "replica_divergence", rank=0, step=14, ranks=[1], parameters=["model.w"], found_by="vote"),
               ev(21.5, "rollback", rank=0, from_step=14, to_step=10, skipped=None, cause="replica_divergence"),
               ev(22, "replay_verified", rank=0, from_step=11, to_step=13, steps=3, of=3, resumed_from=10),
               ev(23, "replay_mismatch", rank=0, step=16, resumed_from=15, what="loss", recorded=1.0, replayed=2.0)]
    summary = summarize(events)
    assert len(summary.hangs) == 1 and len(summary.divergences) == 1 and len(summary.replays) == 2
    assert "replica divergence at step 14 -> back to step 10" in summary.text()
    out.unlink()
    plot(events, summary, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_follows_the_judged_loss_and_keeps_a_rolled_back_spike_where_it_happened():
    """The guard judges the mean over the ranks (a spike on rank 1 is invisible in rank 0's
    loss): the report's curve is that mean, the spike's step is among the thrown-away steps with
    its judged value, and the redone steps carry their own."""
    events = []
    for s in range(1, 8):
        events += [ev(s, "step", rank=0, step=s, loss=0.5, seconds=0.1),
                   ev(s + 0.5, "loss_judged", rank=0, step=s, loss=400.0 if s == 7 else 0.6, ranks=2)]
    events += [ev(7.6, "rollback", rank=0, from_step=7, to_step=5, skipped=[80, 128]),
               ev(7.7, "data_skipped", rank=0, through_step=8)]
    for s in (6, 7, 8):
        events += [ev(8 + s, "step", rank=0, step=s, loss=0.4, seconds=0.1),
                   ev(8.5 + s, "loss_judged", rank=0, step=s, loss=0.45, ranks=2)]
    s = summarize(events)
    assert s.judged_curve == [(1, 0.6), (2, 0.6), (3, 0.6), (4, 0.6), (5, 0.6), (6, 0.45), (7, 0.45), (8, 0.45)]
    assert (7, 400.0) in s.judged_abandoned and s.ranks == 2
    assert s.curve[-1] == (8, 0.4)  # rank 0's own line is kept beside it


def test_report_command_line(tmp_path):
    import json
    import subprocess
    import sys

    from harness.processes import child_env

    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps(ev(s, "step", rank=0, step=s, loss=1.0, seconds=0.5)) + "\n" for s in range(1, 5)))
    cli = [sys.executable, "-m", "elastic_resume.cli", "report"]
    r = subprocess.run([*cli, str(tmp_path), "--json"], capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["steps_final"] == 4 and doc["useful_s"] == 2.0
    r = subprocess.run([*cli, str(tmp_path / "missing.jsonl")], capture_output=True, text=True, env=child_env())
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_report_passes_over_files_that_are_not_event_logs_and_never_merges_runs_silently(tmp_path):
    """The demo's directory holds loss logs beside the event logs, and a reused log directory
    holds several runs: the report reads only event logs, says which files it skipped, and reports
    one run unless told to merge."""
    import json
    import subprocess
    import sys

    from harness.processes import child_env

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("losses.jsonl", [{"rank": 0, "world": 2, "step": s, "loss": 0.5, "samples": [1, 2]} for s in range(1, 4)])
    old = [ev(0, "launch_started", node="n", pid=1, run_id="old-run"),
           *[ev(s, "step", rank=0, step=s, loss=1.0, seconds=0.5) for s in range(1, 9)]]
    new = [ev(100, "launch_started", node="n", pid=2, run_id="new-run"),
           *[ev(100 + s, "step", rank=0, step=s, loss=1.0, seconds=0.5) for s in range(1, 4)]]
    write("run-a.jsonl", old)
    write("run-b.jsonl", new)
    cli = [sys.executable, "-m", "elastic_resume.cli", "report"]

    def report(*flags):
        r = subprocess.run([*cli, str(tmp_path), *flags], capture_output=True, text=True, env=child_env())
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        return r.stdout

    text = report()
    assert "not an event log, skipped: " + str(tmp_path / "losses.jsonl") in text
    assert "these logs hold 2 runs (old-run, new-run); reporting the newest, new-run" in text
    doc = json.loads(report("--json"))
    assert doc["steps_final"] == 3 and len(doc["notes"]) == 2
    assert json.loads(report("--json", "--run-id", "old-run"))["steps_final"] == 8
    merged = json.loads(report("--json", "--all-runs"))
    assert "merging 2 runs: old-run, new-run" in merged["notes"]
    r = subprocess.run([*cli, str(tmp_path / "losses.jsonl")], capture_output=True, text=True, env=child_env())
    assert r.returncode == 2 and "hold no event lines" in r.stderr and "Traceback" not in r.stderr


def test_quick_restarts_of_one_launcher_are_each_counted_and_other_nodes_join_the_incident():
    failures = [{"rank": 0, "exitcode": 1}]
    events = [ev(0, "launch_started", node="n", pid=1)]
    for t in (1, 4, 7):  # one node, three restarts 3 s apart: three incidents
        events.append(ev(t, "restart", node="n", pid=1, failures=failures))
    events.append(ev(7.5, "restart", node="m", pid=2, failures=failures))  # the other node, same incident
    s = summarize(events)
    assert len(s.restarts) == 3


def test_waits_between_sessions_are_reported_and_counted_in_the_elapsed_goodput():
    """A requeued Slurm job: two nodes' launchers per run, a preemption, 120 s in the queue, then
    the same run again; a third run whose launchers were killed (no launch_finished), then one
    more wait. Wall time counts the launchers' time; the waits come on top of it."""
    def run(t0, restart, exits):
        out = []
        for node in ("a", "b"):
            out.append(ev(t0, "launch_started", node=node, pid=t0, scheduler_restarts=restart))
        out += [ev(t0 + s, "step", rank=0, step=int(t0) + s, loss=1.0, seconds=1.0) for s in range(1, 9)]
        for node, code in zip(("a", "b"), exits):
            if code is not None:
                out.append(ev(t0 + 10, "launch_finished", node=node, pid=t0, exit_code=code, reason="x"))
        return out

    events = run(0, 0, (75, 143)) + run(130, 1, (None, None)) + run(200, 2, (0, 0))
    s = summarize(events)
    assert s.sessions == 6 and s.wall_s == 28.0  # the killed run's last event is its step at 138
    assert [(w["seconds"], w["after"], w["scheduler_restart"]) for w in s.waits] == [
        (120.0, "preempted", 1),
        (62.0, "ended without a launch_finished line (the node or launcher was killed)", 2)]
    assert s.elapsed_s == 210.0 and abs(s.goodput_elapsed - 24 / 210) < 1e-9 and abs(s.goodput - 24 / 28) < 1e-9
    text = s.text()
    assert "between sessions   182.0 s in 2 wait(s)" in text and "after the job preempted, back as scheduler restart 1" in text
    assert "elapsed            210.0 s" in text and "11.4% of the elapsed time" in text
    single = summarize(run(0, 0, (0, 0)))
    assert not single.waits and "between sessions" not in single.text() and single.elapsed_s == single.wall_s


def test_report_writes_the_recovery_metrics_as_tensorboard_scalars(tmp_path):
    """``report --tensorboard DIR``: what the Lightning callback gives Lightning's loggers, from the
    event log of a plain loop, read back by TensorBoard's own reader."""
    import json
    import subprocess
    import sys

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from harness.processes import child_env

    events = [
        ev(0, "launch_started", node="n", pid=1),
        *[ev(1 + s, "step", rank=0, step=s, loss=1.0 / s, seconds=1.0) for s in range(1, 7)],
        ev(8, "restart", node="n", pid=1, failures=[{"rank": 1, "exitcode": -9, "signal": "SIGKILL"}]),
        ev(10, "restored", rank=0, step=4),
        *[ev(10 + s - 4, "step", rank=0, step=s, loss=1.0 / s, seconds=1.0) for s in range(5, 9)],
        ev(14.5, "rollback", rank=0, from_step=8, to_step=6, skipped=[100, 140], lr_scale=0.5),
        ev(14.5, "rollback", rank=1, from_step=8, to_step=6, skipped=[100, 140], lr_scale=0.5),  # the same, rank 1
        ev(14.6, "data_skipped", rank=0, through_step=9, samples=40),
        *[ev(15 + s - 7, "step", rank=0, step=s, loss=0.1, seconds=1.0) for s in range(7, 11)],
        ev(20, "launch_finished", node="n", pid=1, exit_code=0, reason="finished"),
    ]
    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    r = subprocess.run([sys.executable, "-m", "elastic_resume.cli", "report", str(log), "--tensorboard",
                        str(tmp_path / "tb")], capture_output=True, text=True, env=child_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "tensorboard" in r.stdout
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()

    def series(tag):
        return [(s.step, round(s.value, 4)) for s in acc.Scalars(f"elastic_resume/{tag}")]

    assert series("loss") == [(1, 1.0), (2, 0.5), (3, 0.3333), (4, 0.25), (5, 0.2), (6, 0.1667),
                              (7, 0.1), (8, 0.1), (9, 0.1), (10, 0.1)]  # the curve that survived
    assert series("rollbacks") == [(8, 1.0)] and series("lr_scale") == [(8, 0.5)]
    assert series("samples_skipped") == [(8, 40.0)]
    assert series("restarts") == [(4, 1.0)]
    assert series("goodput") == [(10, 0.5)]
