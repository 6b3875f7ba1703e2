"""The memory tier: committed steps' files kept in RAM, restored without a storage read, every byte
checked against the manifest it was committed under; anything else comes from storage."""

from __future__ import annotations

import json

import pytest
import torch

from elastic_resume import CheckpointManager
from elastic_resume.checkpoint.format import encode
from elastic_resume.checkpoint.layout import FileKind
from elastic_resume.checkpoint.manifest import FileEntry, Manifest
from elastic_resume.checkpoint.memory_tier import MemoryTier
from elastic_resume.collectives import LocalGroup
from elastic_resume.errors import CheckpointCorruptError, ConfigError
from elastic_resume.storage import digest_bytes, tensor_bytes


def train(model, opt, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(8, 64, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def fresh():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, {"model": model, "optimizer": opt, "counter": {"step": 0}}


def events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_with_rollbacks(tmp_path, name: str, memory_keep: int) -> tuple[dict, list[dict]]:
    """Train, save (blocking and in the background), roll back twice, train on: the final
    parameters and optimizer state, and the events."""
    model, opt, state = fresh()
    log = tmp_path / f"{name}.jsonl"
    mgr = CheckpointManager(tmp_path / name, group=LocalGroup(), keep_last=None, memory_keep=memory_keep, event_log=log)
    for step in range(1, 7):
        train(model, opt, 1, seed=step)
        state["counter"]["step"] = step
        mgr.save(step, state, blocking=step % 2 == 0)
    assert mgr.restore(state, step=5) == 5
    for step in range(6, 9):  # the restored optimizer state is trained on in place
        train(model, opt, 1, seed=100 + step)
        state["counter"]["step"] = step
        mgr.save(step, state, blocking=False)  # buffers of evicted steps are reused here
    assert mgr.restore(state, step=7) == 7
    train(model, opt, 2, seed=999)
    mgr.close()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    final.update({f"opt.{i}.{k}": v.clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()
                  if torch.is_tensor(v)})
    return final, events(log)


def test_a_rollback_from_memory_reads_no_data_file_and_ends_where_one_from_storage_does(tmp_path, monkeypatch):
    stored, stored_events = run_with_rollbacks(tmp_path, "storage", memory_keep=0)
    reads = []
    from elastic_resume.checkpoint.store import CheckpointStore

    original = CheckpointStore.read_tree

    def counting(self, manifest, entry, **kw):
        reads.append((manifest.step, entry.path))
        return original(self, manifest, entry, **kw)

    monkeypatch.setattr(CheckpointStore, "read_tree", counting)
    held, held_events = run_with_rollbacks(tmp_path, "memory", memory_keep=2)
    assert reads == []  # both rollbacks came from memory
    assert stored.keys() == held.keys()
    assert all(torch.equal(stored[k], held[k]) for k in stored)
    assert [e["tier"] for e in stored_events if e["event"] == "restored"] == ["storage", "storage"]
    assert [(e["step"], e["tier"]) for e in held_events if e["event"] == "restored"] == [(5, "memory"), (7, "memory")]


def test_only_the_newest_steps_are_held_and_a_restore_takes_them(tmp_path):
    _, _, state = fresh()
    mgr = CheckpointManager(tmp_path / "ckpt", group=LocalGroup(), keep_last=None, memory_keep=2)
    for step in (1, 2, 3):
        mgr.save(step, state)
    assert mgr.memory.steps == [2, 3]
    assert mgr.restore(state, step=1) == 1 and mgr.last_restore_tier == "storage"  # evicted: from storage
    assert mgr.restore(state, step=3) == 3 and mgr.last_restore_tier == "memory"
    # The restored state now owns those bytes: the tier no longer holds step 3.
    assert mgr.memory.steps == [2]
    assert mgr.restore(state, step=3) == 3 and mgr.last_restore_tier == "storage"
    off = CheckpointManager(tmp_path / "off", group=LocalGroup(), memory_keep=0)
    off.save(1, state)
    assert off.memory.steps == [] and off.memory.nbytes == 0
    with pytest.raises(ConfigError, match="memory_keep"):
        CheckpointManager(tmp_path / "bad", group=LocalGroup(), memory_keep=-1)


def test_a_step_saved_again_or_retired_is_never_served_from_an_older_copy(tmp_path):
    _, _, state = fresh()
    mgr = CheckpointManager(tmp_path / "ckpt", group=LocalGroup(), keep_last=None, memory_keep=3)
    mgr.save(1, state)
    mgr.save(2, state)
    assert mgr.restore(state, step=1) == 1 and mgr.last_restore_tier == "memory"
    # Step 2 lies on the abandoned timeline: retiring it drops its copy too.
    mgr.retire_newer_than(1, reason="test")
    assert mgr.memory.steps == []
    mgr.allow_replace(1)
    state["counter"]["step"] = 41
    mgr.save(1, state)  # saved again: a new attempt, held under it
    state["counter"]["step"] = 0
    assert mgr.restore(state, step=1) == 1 and mgr.last_restore_tier == "memory"
    assert state["counter"]["step"] == 41


def test_a_damaged_memory_copy_is_reported_and_the_file_read_from_storage(tmp_path):
    model, _, state = fresh()
    log = tmp_path / "events.jsonl"
    mgr = CheckpointManager(tmp_path / "ckpt", group=LocalGroup(), memory_keep=2, event_log=log)
    mgr.save(1, state)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for buffer in mgr.memory.held_files(1).values():
        buffer[-1] ^= 0x01
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert mgr.restore(state, step=1) == 1 and mgr.last_restore_tier == "storage"
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    found = [e for e in events(log) if e["event"] == "corruption_found"]
    assert found and all(e["tier"] == "memory" and "digest mismatch" in e["reason"] for e in found)


# -- the tier itself (pure) --------------------------------------------------------------------

def held_step(tier: MemoryTier, step: int, attempt: str, payloads: dict[str, torch.Tensor]) -> Manifest:
    files = {path: tier.copy(encode({"tensors": {0: t}})) for path, t in payloads.items()}
    tier.hold(step, attempt, files)
    entries = [FileEntry(path, f.size, digest_bytes(tensor_bytes(f.buffer)), 0, FileKind.SHARED)
               for path, f in files.items()]
    return Manifest(step=step, attempt=attempt, world_size=1, files=entries)


def test_the_tier_keeps_the_newest_commits_reuses_evicted_buffers_and_checks_every_take():
    tier = MemoryTier(keep=2)
    m1 = held_step(tier, 1, "a1", {"f": torch.arange(100)})
    buffer_of_1 = tier.held_files(1)["f"]
    held_step(tier, 2, "a2", {"f": torch.arange(100) * 2})
    held_step(tier, 3, "a3", {"f": torch.arange(100) * 3})
    assert tier.steps == [2, 3] and not tier.covers(m1, 0)
    # Step 1's buffer is the spare the next copy of the same size fills (no new pages).
    m4 = held_step(tier, 4, "a4", {"f": torch.arange(100) * 4})
    assert tier.held_files(4)["f"].data_ptr() == buffer_of_1.data_ptr()
    assert tier.covers(m4, 0)
    other_attempt = Manifest(step=4, attempt="zz", world_size=1, files=m4.files)
    assert not tier.covers(other_attempt, 0) and tier.take(other_attempt, m4.files[0]) is None
    wrong = FileEntry("f", m4.files[0].size, "xxh3_64:0000000000000000", 0, FileKind.SHARED)
    with pytest.raises(CheckpointCorruptError, match="digest mismatch"):
        tier.take(m4, wrong)
    assert tier.steps == [3]  # a copy that failed its check is dropped, never offered again
    m3 = Manifest(step=3, attempt="a3", world_size=1,
                  files=[FileEntry("f", tier.held_files(3)["f"].numel(), "", 0, FileKind.SHARED)])
    tier.forget_newer_than(2)
    assert tier.steps == [] and not tier.covers(m3, 0)


def test_spare_buffers_of_several_sizes_are_found_by_size():
    tier = MemoryTier(keep=1)
    held_step(tier, 1, "a1", {"small": torch.arange(10), "large": torch.arange(1000)})
    large = tier.held_files(1)["large"]
    held_step(tier, 2, "a2", {"small": torch.arange(10) + 1, "large": torch.arange(1000) + 1})  # step 1 -> spares
    # The next copy of the large file's size reuses the large spare, whatever its place in the list.
    copied = tier.copy(encode({"tensors": {0: torch.arange(1000) + 2}}))
    assert copied.buffer.data_ptr() == large.data_ptr()
