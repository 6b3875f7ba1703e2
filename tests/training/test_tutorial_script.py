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
