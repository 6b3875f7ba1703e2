"""Unit tests of the pure pieces behind rank-coordinated checkpoints: the byte assignment, the
resumable sampler's arithmetic, and the drift diff. No process group."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from elastic_resume import ResumableDistributedSampler, StateError
from elastic_resume.fingerprint import compute, diff
from elastic_resume.manager import assign_tensors


def test_assignment_spreads_bytes_evenly_and_deterministically():
    sizes = [100, 90, 80, 10, 10, 10, 5, 5]
    owner = assign_tensors(sizes, 2)
    load = Counter()
    for s, r in zip(sizes, owner):
        load[r] += s
    assert max(load.values()) == 170  # the best possible split: {90, 80} vs the rest
    assert Counter(assign_tensors([10] * 8, 4)) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert assign_tensors(sizes, 2) == owner
    assert assign_tensors(sizes, 1) == [0] * len(sizes)
    assert set(assign_tensors([1] * 3, 8)) == {0, 1, 2}  # more ranks than tensors: some write none


def epoch_indices(n, world, epoch, seed=3, start=0):
    """What all ranks together draw in one epoch from position ``start``."""
    seen = []
    for rank in range(world):
        s = ResumableDistributedSampler(range(n), num_replicas=world, rank=rank, seed=seed, drop_last=True)
        s.set_epoch(epoch)
        s.consumed = start
        seen += list(s)
    return seen


def test_sampler_partitions_the_epoch_and_resumes_at_any_world_size():
    n = 96
    full = epoch_indices(n, 4, epoch=1)
    assert sorted(full) == list(range(n))
    # 4 ranks take 2 steps of 4 samples each (32 samples), then the job continues at 2 ranks.
    samplers = [ResumableDistributedSampler(range(n), num_replicas=4, rank=r, seed=3, drop_last=True) for r in range(4)]
    taken = []
    for s in samplers:
        s.set_epoch(1)
        it = iter(s)
        taken += [next(it) for _ in range(8)]
    state = samplers[0].state_dict()
    assert state["consumed"] == 32 and state["epoch"] == 1
    rest = []
    for r in range(2):
        s = ResumableDistributedSampler(range(n), num_replicas=2, rank=r, seed=3, drop_last=True)
        s.load_state_dict(state)
        s.set_epoch(1)  # same epoch: keeps the position
        assert len(s) == 32
        rest += list(s)
    assert sorted(taken + rest) == list(range(n))


def test_sampler_refuses_a_different_dataset_or_seed():
    s = ResumableDistributedSampler(range(10), num_replicas=1, rank=0, seed=1)
    with pytest.raises(StateError, match="dataset of 12 samples but the dataset now has 10"):
        s.load_state_dict(dict(s.state_dict(), dataset_len=12))
    with pytest.raises(StateError, match="seed=2"):
        s.load_state_dict(dict(s.state_dict(), seed=2))


def test_sampler_new_epoch_resets_position_and_manual_advance():
    s = ResumableDistributedSampler(range(8), num_replicas=2, rank=0, auto_track=False)
    list(s)
    assert s.consumed == 0  # auto_track off: the loop says what was trained on
    s.advance(4)
    assert s.consumed == 8 and s.epoch_finished
    s.set_epoch(1)
    assert s.consumed == 0 and len(s) == 4


def test_drift_diff_names_each_change_and_honours_allow_list():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    a = compute({"model": model, "opt": opt}, world_size=2, config={"lr": 0.1, "data": {"bs": 8}}, data_description="v1")
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.5)
    b = compute({"model": model2, "opt": opt2}, world_size=4, config={"lr": 0.1, "data": {"bs": 16}}, data_description="v1")
    lines = [d.line() for d in diff(a, b)]
    assert "world_size: saved 2, now 4" in lines
    assert "config.data.bs: saved 8, now 16" in lines
    assert "optimizer.opt.group0.momentum: saved 0.9, now 0.5" in lines
    assert 'model.model.weight: saved "float32[2, 4]", now "float32[3, 4]"' in lines
    assert all(not l.startswith("data") for l in lines)
    allowed = [d.name for d in diff(a, b, allow=["model.*", "config.*", "world_size"])]
    assert allowed == ["optimizer.opt.group0.momentum"]
    assert diff(a, a) == []


def test_scheduled_lr_is_not_drift():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = compute({"opt": opt}, world_size=1)
    for _ in range(3):
        opt.step()
        sched.step()
    assert diff(before, compute({"opt": opt}, world_size=1)) == []
