"""What "newest" means when a run saves below steps that already exist: a restore of an older
step starts a new timeline, and the step just committed is never deleted by what follows it."""

from __future__ import annotations

import torch

from elastic_resume import CheckpointManager
from elastic_resume.events import read_events


def saved(mgr: CheckpointManager, *steps: int) -> None:
    for s in steps:
        mgr.save(s, {"w": torch.full((4,), float(s))})


def test_restoring_an_older_step_then_saving_makes_the_new_timeline_the_newest(tmp_path):
    log = tmp_path / "events.jsonl"
    saved(CheckpointManager(tmp_path / "ckpt", keep_last=3), 100, 200, 300, 400)
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=3, event_log=log)
    state = {"w": torch.zeros(4)}
    assert mgr.restore(state, step=200) == 200
    # Nothing is retired by the restore alone: until this run commits, the old steps stand.
    assert mgr.committed_steps() == [400, 300, 200]
    saved(mgr, 250)  # below the abandoned 300 and 400: kept, and they are retired
    assert mgr.committed_steps() == [250, 200]
    retired = [e for e in read_events(log) if e["event"] == "checkpoint_retired"]
    assert sorted(e["step"] for e in retired) == [300, 400]
    assert all("abandoned timeline: this run restored step 200 and committed step 250" in e["reason"] for e in retired)
    state = {"w": torch.zeros(4)}
    assert CheckpointManager(tmp_path / "ckpt").restore(state) == 250
    assert torch.equal(state["w"], torch.full((4,), 250.0))


def test_saving_a_step_of_the_abandoned_timeline_replaces_it(tmp_path):
    saved(CheckpointManager(tmp_path / "ckpt", keep_last=None), 10, 20, 30)
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=None)
    mgr.restore({"w": torch.zeros(4)}, step=10)
    mgr.save(20, {"w": torch.full((4,), -20.0)})  # the old step 20 is this run's to replace, not a conflict
    assert mgr.committed_steps() == [20, 10]
    state = {"w": torch.zeros(4)}
    assert CheckpointManager(tmp_path / "ckpt").restore(state) == 20
    assert torch.equal(state["w"], torch.full((4,), -20.0))


def test_a_step_committed_by_someone_else_after_the_restore_is_not_retired(tmp_path):
    saved(CheckpointManager(tmp_path / "ckpt", keep_last=None), 10, 20)
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=None)
    mgr.restore({"w": torch.zeros(4)}, step=10)
    other = CheckpointManager(tmp_path / "ckpt", keep_last=None)
    other.allow_replace(20)
    other.save(20, {"w": torch.full((4,), 7.0)})  # a different commit of step 20 than the one seen
    saved(mgr, 15)
    assert mgr.committed_steps() == [20, 15, 10]


def test_the_step_just_committed_survives_retention_below_newer_steps(tmp_path):
    # A plain restore() picks the newest; saving below existing steps (another job on the root,
    # a lower step counter) never has retention delete what was just written.
    saved(CheckpointManager(tmp_path / "ckpt", keep_last=2), 500, 600)
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    saved(mgr, 7)
    assert 7 in mgr.committed_steps()


def test_abandoned_steps_stay_when_the_step_just_committed_does_not_stand(tmp_path):
    import os

    from elastic_resume.checkpoint.layout import step_dir

    log = tmp_path / "events.jsonl"
    saved(CheckpointManager(tmp_path / "ckpt", keep_last=None), 10, 20, 30)
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=None, event_log=log)
    mgr.restore({"w": torch.zeros(4)}, step=10)
    commit = mgr.store.commit

    def commit_then_lose_a_file(manifest, **kw):  # the disk loses the new step's data right after its commit
        commit(manifest, **kw)
        os.remove(os.path.join(tmp_path, "ckpt", step_dir(manifest.step), manifest.files[0].path))

    mgr.store.commit = commit_then_lose_a_file
    saved(mgr, 15)
    assert mgr.committed_steps() == [30, 20, 15, 10]  # nothing retired on the word of a step that does not stand
    failed = [e for e in read_events(log) if e["event"] == "prune_failed"]
    assert failed and "abandoned steps kept" in failed[0]["error"]
