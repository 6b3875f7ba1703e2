"""The resumable sampler's arithmetic, and settling DDP's gradient buckets."""

from __future__ import annotations

import pytest
import torch

from elastic_resume import ResumableDistributedSampler, StateError


def epoch_indices(n, world, epoch, seed=3, start=0):
    """What all ranks together draw in one epoch from position ``start``."""
    seen = []
    for rank in range(world):
        s = ResumableDistributedSampler(range(n), num_replicas=world, rank=rank, seed=seed, drop_last=True)
        s.seek(epoch * n + start)
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
        assert len(s) == 48  # a whole epoch's, as DistributedSampler's; this pass yields the rest
        rest += list(s)
    assert sorted(taken + rest) == list(range(n))


def test_a_resumed_pass_pads_the_epoch_as_the_uninterrupted_one_and_as_distributed_sampler():
    n, world = 512, 3  # 512 is no multiple of 3: the last batch is padded
    reference = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=2, seed=3)
    whole = ResumableDistributedSampler(range(n), num_replicas=world, rank=2, seed=3)
    assert list(whole) == list(reference)
    resumed = ResumableDistributedSampler(range(n), num_replicas=world, rank=2, seed=3)
    resumed.load_state_dict({**whole.state_dict(), "epoch": 0, "consumed": 30 * world})
    assert list(resumed) == list(reference)[30:]  # the pad at the end too, not the resumed pass's head


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


def test_settle_ddp_buckets_builds_a_zero_loss_from_any_output_and_names_what_it_cannot():

    from elastic_resume.training.ddp import _zero_loss, settle_ddp_buckets

    a = torch.ones(2, requires_grad=True)
    out = {"logits": a * 3, "aux": (a * 2, "text")}
    loss = _zero_loss(out)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(a.grad, torch.zeros(2))
    with pytest.raises(TypeError, match="str"):
        _zero_loss("not a tensor")
    # Without DDP (a plain module) it is a harmless no-op that leaves no gradients and the mode.
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5))
    model.train()
    settle_ddp_buckets(model, torch.randn(4, 3))
    assert model.training and all(p.grad is None for p in model.parameters())
