"""The checkpoint store through the public API, on local disk and on the S3 server alike:
round trips, every kind of damage, commit conflicts, retention."""

from __future__ import annotations

import os
import random

import pytest
import torch

from elastic_resume import (
    CheckpointManager,
    CommitConflictError,
    NoCheckpointError,
    StateError,
)
from elastic_resume.checkpoint.layout import step_dir
from elastic_resume.checkpoint.manifest import Manifest
from elastic_resume.checkpoint.store import CheckpointStore
from elastic_resume.events import read_events
from tests.helpers import tamper


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    loss = model(torch.randn(5, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    return {"model": model, "optimizer": opt, "scheduler": sched, "epoch": 3, "buffer": torch.randn(7)}


def fresh_like() -> dict:
    state = make_state(seed=123)
    state["epoch"] = None
    state["buffer"] = None
    return state


def assert_same(a: dict, b: dict) -> None:
    for (ka, va), (kb, vb) in zip(a["model"].state_dict().items(), b["model"].state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    sa, sb = a["optimizer"].state_dict(), b["optimizer"].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name, t in sa["state"][k].items():
            assert torch.equal(t, sb["state"][k][name])
    assert a["scheduler"].state_dict() == b["scheduler"].state_dict()
    assert a["epoch"] == b["epoch"]
    assert torch.equal(a["buffer"], b["buffer"])


def manager(root, **kw) -> CheckpointManager:
    return CheckpointManager(root.url, storage_options=root.storage_options, **kw)


def saved_run(root, steps=(10, 20, 30), **kw) -> tuple[CheckpointManager, dict[int, dict]]:
    mgr = manager(root, keep_last=None, **kw)
    states = {}
    for i, s in enumerate(steps):
        states[s] = make_state(seed=i)
        mgr.save(s, states[s], metadata={"loss": 1.0 / (i + 1)})
    return mgr, states


def test_round_trip_restores_in_place(root):
    mgr, states = saved_run(root)
    target = fresh_like()
    model_obj = target["model"]
    assert manager(root).restore(target) == 30
    assert target["model"] is model_obj  # modules are restored in place
    assert_same(target, states[30])
    assert mgr.latest() == 30


def test_restore_explicit_step(root):
    _, states = saved_run(root)
    target = fresh_like()
    assert manager(root).restore(target, step=20) == 20
    assert_same(target, states[20])


def test_restore_empty_root_returns_none(root):
    assert manager(root).restore(fresh_like()) is None
    assert manager(root).latest() is None


@pytest.mark.parametrize(
    "damage",
    ["truncate_zero", "truncate_random", "flip_byte", "missing_file", "malformed_manifest",
     "unknown_version", "path_parent", "path_absolute", "path_other_bucket", "checksum_mismatch",
     "manifest_missing_files_list"],
)
def test_restore_skips_damaged_newest_step(root, damage, tmp_path):
    _, states = saved_run(root)
    st = tamper.raw(root.url, root.storage_options)
    data = tamper.data_files(st, 30)[0]
    size = len(tamper.get(st, data))
    doc = tamper.manifest_doc(st, 30)
    if damage == "truncate_zero":
        tamper.truncate(st, data, 0)
    elif damage == "truncate_random":
        tamper.truncate(st, data, random.Random(7).randrange(1, size))
    elif damage == "flip_byte":
        tamper.flip_byte(st, data, random.Random(3).randrange(size))
    elif damage == "missing_file":
        st.delete(data)
    elif damage == "malformed_manifest":
        tamper.put(st, f"{step_dir(30)}/MANIFEST.json", b'{"format": "elastic-resume-manifest", "vers')
    elif damage == "unknown_version":
        tamper.rewrite_manifest(st, 30, dict(doc, version=99))
    elif damage in ("path_parent", "path_absolute", "path_other_bucket"):
        bad = {"path_parent": f"{doc['attempt']}/../../step-000000000020/x.ert",
               "path_absolute": "/etc/passwd",
               "path_other_bucket": "s3://other-bucket/secret.ert"}[damage]
        doc["files"][0]["path"] = bad
        tamper.rewrite_manifest(st, 30, doc)
    elif damage == "checksum_mismatch":
        doc["metadata"]["loss"] = 0.0001
        tamper.rewrite_manifest(st, 30, doc, fix_checksum=False)
    elif damage == "manifest_missing_files_list":
        del doc["files"]
        tamper.rewrite_manifest(st, 30, doc)

    log = tmp_path / "events.jsonl"
    mgr = manager(root, event_log=log)
    target = fresh_like()
    assert mgr.restore(target) == 20
    assert_same(target, states[20])
    events = read_events(log)
    corrupt = [e for e in events if e["event"] == "corruption_found"]
    assert corrupt and corrupt[0]["step"] == 30 and corrupt[0]["reason"]
    assert any(e["event"] == "restored" and e["step"] == 20 for e in events)
    assert mgr.latest() == 20
    # The damaged step is still there for a human to look at: nothing is deleted on read.
    assert CheckpointStore(st).has_manifest(30)


def test_restore_refuses_pickle_that_would_run_code(root, tmp_path):
    _, _states = saved_run(root)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import io
    import pickle

    buf = io.BytesIO()
    torch.save({"model": Exploit()}, buf, pickle_module=pickle)
    for payload in (buf.getvalue(), pickle.dumps(Exploit())):
        st = tamper.raw(root.url, root.storage_options)
        data = tamper.data_files(st, 30)[0]
        tamper.put(st, data, payload)
        doc = tamper.manifest_doc(st, 30)
        from elastic_resume.storage import digest_bytes

        doc["files"][0]["size"] = len(payload)
        doc["files"][0]["digest"] = digest_bytes(payload)
        tamper.rewrite_manifest(st, 30, doc)  # a perfectly consistent, malicious checkpoint
        log = tmp_path / "ev.jsonl"
        target = fresh_like()
        assert manager(root, event_log=log).restore(target) == 20
        assert not marker.exists()
        reasons = [e["reason"] for e in read_events(log) if e["event"] == "corruption_found"]
        assert any("pickle" in r and "never unpickles" in r for r in reasons)


def test_all_steps_corrupt_raises_instead_of_starting_over(root):
    saved_run(root, steps=(1, 2))
    st = tamper.raw(root.url, root.storage_options)
    for s in (1, 2):
        tamper.flip_byte(st, tamper.data_files(st, s)[0], 100)
    with pytest.raises(NoCheckpointError, match=r"step 2: .*digest mismatch.*step 1"):
        manager(root).restore(fresh_like())


def test_second_commit_of_same_step_is_refused_and_first_intact(root):
    _mgr, states = saved_run(root, steps=(5,))
    st = tamper.raw(root.url, root.storage_options)
    before = tamper.get(st, f"{step_dir(5)}/MANIFEST.json")
    other = make_state(seed=99)
    with pytest.raises(CommitConflictError, match="step 5 is already committed"):
        manager(root).save(5, other)
    assert tamper.get(st, f"{step_dir(5)}/MANIFEST.json") == before
    target = fresh_like()
    assert manager(root).restore(target) == 5
    assert_same(target, states[5])


def test_store_commit_is_create_only_at_storage_level(root):
    """Two committers racing on the same step: exactly one wins, whatever the backend."""
    saved_run(root, steps=(5,))
    st = tamper.raw(root.url, root.storage_options)
    store = CheckpointStore(st)
    m = store.read_manifest(5)
    clone = Manifest(step=5, attempt=m.attempt, world_size=1, files=m.files, metadata={"other": True})
    with pytest.raises(CommitConflictError):
        store.commit(clone)
    assert store.read_manifest(5).metadata == m.metadata


def test_incomplete_step_is_invisible(root):
    _, states = saved_run(root, steps=(1,))
    st = tamper.raw(root.url, root.storage_options)
    # A save that died before its commit: data present, no manifest.
    tamper.put(st, f"{step_dir(2)}/attempt-x/rank-00000.ert", b"partial")
    target = fresh_like()
    assert manager(root).restore(target) == 1
    assert_same(target, states[1])


def test_unsupported_state_value_names_the_key(root):
    mgr = manager(root)
    with pytest.raises(Exception, match=r"state\['cfg'\]\['fn'\].*cannot be checkpointed"):
        mgr.save(1, {"cfg": {"fn": lambda x: x}})
    assert mgr.committed_steps() == []


def test_restore_with_key_missing_in_checkpoint_is_a_clear_error(root):
    saved_run(root, steps=(1,))
    target = fresh_like()
    target["scaler"] = {"scale": 1.0}
    with pytest.raises(StateError, match=r"step 1 has no entry for 'scaler'"):
        manager(root).restore(target)


def test_retention_keeps_last_and_milestones(root):
    mgr = manager(root, keep_last=2, keep_every=100)
    state = make_state()
    for s in (50, 100, 150, 200, 250, 300):
        mgr.save(s, state)
    assert mgr.committed_steps() == [300, 250, 200, 100]


def test_prune_never_deletes_newest_verified(root):
    mgr = manager(root, keep_last=None)
    state = make_state()
    for s in (1, 2, 3):
        mgr.save(s, state)
    st = tamper.raw(root.url, root.storage_options)
    st.delete(tamper.data_files(st, 3)[0])  # newest is broken
    plan = CheckpointStore(st).prune(keep_last=1)
    assert plan.delete == [1]
    assert plan.keep[2] == "newest verified step"
    assert mgr.latest() == 2


def test_prune_removes_stale_incomplete_but_not_newer_ones(root):
    mgr = manager(root, keep_last=None)
    mgr.save(10, make_state())
    st = tamper.raw(root.url, root.storage_options)
    tamper.put(st, f"{step_dir(5)}/a/rank-00000.ert", b"old partial")
    tamper.put(st, f"{step_dir(20)}/b/rank-00000.ert", b"maybe in flight")
    plan = CheckpointStore(st).prune(keep_last=1)
    assert plan.delete_incomplete == [5]
    assert CheckpointStore(st).step_dirs() == [10, 20]


def test_large_state_streams_through_multipart_on_s3(root, monkeypatch):
    from elastic_resume.storage.s3 import S3Storage

    monkeypatch.setattr(S3Storage, "PART_SIZE", 5 << 20)  # S3's minimum part size
    monkeypatch.setattr(S3Storage, "MULTIPART_THRESHOLD", 8 << 20)
    big = {"w": torch.randn(6 << 20 // 4 * 4)}  # 24 MiB -> 5 parts on S3
    manager(root).save(1, big)
    target = {"w": None}
    assert manager(root).restore(target) == 1
    assert torch.equal(target["w"], big["w"])


def test_save_rejects_bad_step(root):
    with pytest.raises(Exception, match="step must be a non-negative integer"):
        manager(root).save(-1, {"x": 1})


def test_resaving_a_step_that_restore_skipped_replaces_it(root):
    mgr, _states = saved_run(root, steps=(1, 2))
    st = tamper.raw(root.url, root.storage_options)
    tamper.flip_byte(st, tamper.data_files(st, 2)[0], 77)
    mgr = manager(root, keep_last=None)
    target = fresh_like()
    assert mgr.restore(target) == 1
    replacement = make_state(seed=42)
    mgr.save(2, replacement)  # the corrupt step 2 gives way; no CommitConflictError
    target = fresh_like()
    assert manager(root).restore(target) == 2
    assert_same(target, replacement)
    assert manager(root).store.verify(2).ok


def test_step_directories_moved_to_another_disk_and_linked_back_are_loaded_and_verified(tmp_path):
    import shutil

    from elastic_resume.storage import open_storage

    root = tmp_path / "ckpt"
    mgr = CheckpointManager(root, keep_last=None)
    for s in (1, 2):
        mgr.save(s, {"w": torch.full((4,), float(s))})
    other_disk = tmp_path / "other-disk"
    other_disk.mkdir()
    for s in (1, 2):
        shutil.move(root / step_dir(s), other_disk / step_dir(s))
        os.symlink(other_disk / step_dir(s), root / step_dir(s))
    state = {"w": torch.zeros(4)}
    assert CheckpointManager(root).restore(state) == 2 and torch.equal(state["w"], torch.full((4,), 2.0))
    # The same verification: a flipped byte behind the link is found and skipped.
    data = sorted((other_disk / step_dir(2)).rglob("*.safetensors"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert CheckpointManager(root).restore({"w": torch.zeros(4)}) == 1
    # Retention removes the link, never what it points to.
    mgr = CheckpointManager(root, keep_last=1)
    mgr.save(3, {"w": torch.full((4,), 3.0)})
    assert mgr.committed_steps() == [3]
    assert not os.path.lexists(root / step_dir(1)) and (other_disk / step_dir(1)).is_dir()
    assert open_storage(str(root), {}).list_dirs() == [step_dir(3)]


def test_step_directory_names_never_alias_one_step(tmp_path):
    from elastic_resume.checkpoint.layout import parse_step_dir

    assert parse_step_dir("step-000000000001") == 1 and parse_step_dir("step-1000000000000") == 10**12
    for alias in ("step-0000000000001", "step-٠٠٠٠٠٠٠٠٠٠٠١", "step-00000000000１", "step-00000000001"):
        assert parse_step_dir(alias) is None, alias
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=None)
    mgr.save(1, {"w": torch.ones(4)})
    os.rename(tmp_path / "ckpt" / step_dir(1), tmp_path / "ckpt" / "step-0000000000001")
    assert mgr.committed_steps() == []


def test_prune_never_deletes_a_save_whose_attempt_directory_has_no_file_yet(tmp_path):
    from elastic_resume.checkpoint.layout import new_attempt_id

    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=1)
    mgr.save(5, {"w": torch.ones(4)})
    # Another job on the root began saving step 3 (below ours) a moment ago: only its attempt
    # directory exists so far. Pruning after our next save must leave it alone.
    in_flight = tmp_path / "ckpt" / step_dir(3) / new_attempt_id()
    in_flight.mkdir(parents=True)
    empty = tmp_path / "ckpt" / step_dir(2)
    empty.mkdir()  # a save that has created its step directory and nothing else yet
    mgr.save(6, {"w": torch.ones(4)})
    assert in_flight.is_dir() and empty.is_dir()
    old = tmp_path / "ckpt" / step_dir(4) / "20000101T000000-0123456789"
    old.mkdir(parents=True)  # an attempt that began long before the newest commit: abandoned
    mgr.save(7, {"w": torch.ones(4)})
    assert not old.parent.exists()


def test_restore_refills_plain_dicts_and_lists_in_place(tmp_path):
    """A script that keeps a reference to a counter dict it put in the state (``self.progress =
    state["progress"]``) sees the restored values, as with ``load_state_dict``."""
    progress, seen = {"epoch": 3, "step": 70}, [1, 2]
    CheckpointManager(tmp_path).save(70, {"progress": progress, "seen": seen, "lr": 0.5})
    mine, held = {"epoch": 0, "step": 0}, []
    state = {"progress": mine, "seen": held, "lr": 1.0}
    assert CheckpointManager(tmp_path).restore(state) == 70
    assert state["progress"] is mine and mine == progress and held == seen and state["lr"] == 0.5


def test_a_restore_names_a_step_counter_that_was_stale_when_saved(tmp_path, caplog):
    """A counter updated only on periodic saves holds an old value in a save at another step (a
    preemption): the restore says so, naming it, instead of letting the loop train steps again."""
    CheckpointManager(tmp_path).save(83, {"w": torch.ones(2), "progress": {"step": 50}, "step": 83})
    state = {"w": torch.zeros(2), "progress": {"step": 0}, "step": 0}
    with caplog.at_level("WARNING", logger="elastic_resume"):
        assert CheckpointManager(tmp_path).restore(state) == 83
    assert "restored step 83, but state['progress']['step'] is 50" in caplog.text
    assert "state['step']" not in caplog.text  # that one is current
    caplog.clear()
    CheckpointManager(tmp_path / "current").save(7, {"progress": {"step": 7}})
    with caplog.at_level("WARNING", logger="elastic_resume"):
        CheckpointManager(tmp_path / "current").restore({"progress": {"step": 0}})
    assert "was not current" not in caplog.text
