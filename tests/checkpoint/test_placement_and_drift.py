"""Unit tests of the pure pieces behind rank-coordinated checkpoints: who writes which tensor, and the drift diff.
No process group."""

from __future__ import annotations

from collections import Counter

import torch

from elastic_resume.checkpoint.fingerprint import compute, diff
from elastic_resume.checkpoint.saving import assign_tensors


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
    assert all(not line.startswith("data") for line in lines)
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
