"""The pytorch/examples DDP tutorial's shape (``tests/helpers/tutorial_multinode.py``) under a
real ``elastic-resume launch``: a peek at the batch size every epoch, ``set_epoch`` after it, its
own ``destroy_process_group``; killed mid-epoch, it resumes bit for bit."""

from __future__ import annotations

import json
import os

import pytest

from harness.processes import REPO
from tests.helpers.launcher import launcher_cmd, run

SCRIPT = os.path.join(REPO, "tests", "helpers", "tutorial_multinode.py")
EPOCHS, SAVE_EVERY, BATCH = 3, 5, 8
STEPS_PER_EPOCH = 256 // 2 // BATCH  # 16: 256 samples, 2 ranks


def launch(tmp_path, name: str, die_at_step: int = 0):
    log = tmp_path / f"{name}.jsonl"
    r = run(launcher_cmd("--standalone", "--nproc-per-node=2", "--max-restarts=2",
                         f"--er-event-log={tmp_path / (name + '-events.jsonl')}", script=SCRIPT,
                         args=(str(EPOCHS), str(SAVE_EVERY), "--batch_size", str(BATCH),
                               "--snapshot_path", str(tmp_path / name), "--loss_log", str(log),
                               "--die_at_step", str(die_at_step))))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return r, rows


@pytest.mark.slow
def test_the_tutorials_shape_trains_every_step_and_resumes_bit_exact_after_a_crash(tmp_path):
    _, whole = launch(tmp_path, "whole")
    for rank in (0, 1):
        per_epoch = [sum(1 for r in whole if r["rank"] == rank and r["epoch"] == e) for e in range(EPOCHS)]
        assert per_epoch == [STEPS_PER_EPOCH] * EPOCHS  # the peek consumed nothing
    # Rank 1 dies at step 23 (7 steps into epoch 1); the last snapshot is step 20, mid-epoch: the
    # restarted group peeks at a batch, then must continue with the 5th batch of epoch 1.
    r, resumed = launch(tmp_path, "resumed", die_at_step=STEPS_PER_EPOCH + 7)
    assert "Resuming training from snapshot at Epoch 1" in r.stdout + r.stderr
    last = {(row["rank"], row["step"]): row["loss"] for row in resumed}  # the rerun's value wins
    assert last == {(row["rank"], row["step"]): row["loss"] for row in whole}
    redone = [row["step"] for row in resumed if row["rank"] == 0]
    assert redone.count(21) == 2 and redone.count(20) == 1  # steps after the snapshot were redone once


@pytest.mark.slow
def test_the_tutorials_plain_loop_honours_a_preemption_with_one_line(tmp_path):
    """CheckpointManager.save_if_preempted at the step boundary: SIGUSR1 to the launcher saves
    the same step on both ranks, exit 75; the rerun continues from it, bit for bit."""
    import signal
    import time

    from elastic_resume.events import read_events
    from tests.helpers.launcher import start, stop, wait_event

    _, whole = launch(tmp_path, "whole")
    log, events = tmp_path / "preempted.jsonl", str(tmp_path / "preempted-events.jsonl")
    cmd = launcher_cmd("--standalone", "--nproc-per-node=2", f"--er-event-log={events}", script=SCRIPT,
                       args=(str(EPOCHS), str(SAVE_EVERY), "--batch_size", str(BATCH), "--snapshot_path",
                             str(tmp_path / "preempted"), "--loss_log", str(log)))
    p = start(cmd, str(tmp_path / "launch.log"), env={"STEP_SECONDS": "0.1"})
    try:
        wait_event(events, lambda e: e["event"] == "save_committed" and e["step"] == 10, proc=p)
        time.sleep(0.25)
        p.send_signal(signal.SIGUSR1)
        assert p.wait(timeout=120) == 75, (tmp_path / "launch.log").read_text()[-3000:]
    finally:
        stop(p)
    saved = [e["step"] for e in read_events(events) if e["event"] == "preemption_save"]
    assert len(saved) == 2 and len(set(saved)) == 1 and saved[0] % SAVE_EVERY != 0  # both ranks, one odd step
    assert "preemption_ignored" not in [e["event"] for e in read_events(events)]
    r = run(cmd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert {(row["rank"], row["step"]): row["loss"] for row in rows} == {(row["rank"], row["step"]): row["loss"]
                                                                          for row in whole}
    assert len(rows) == len(whole)  # no step trained twice


def test_a_script_that_saves_but_never_checks_for_preemption_is_told_so(tmp_path, monkeypatch, caplog):
    import torch

    from elastic_resume import CheckpointManager, preemption

    monkeypatch.setenv("ER_LAUNCHER_PID", "1")  # as under elastic-resume launch
    monkeypatch.setattr(preemption, "_consumers", 0)  # nothing in this process checks the flag
    mgr = CheckpointManager(tmp_path / "ckpt")
    with caplog.at_level("WARNING", logger="elastic_resume"):
        mgr.save(1, {"w": torch.ones(1)})
        mgr.save(2, {"w": torch.ones(1)})
    assert caplog.text.count("never checks for preemption") == 1 and "save_if_preempted" in caplog.text
