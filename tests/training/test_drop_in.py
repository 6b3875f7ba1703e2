"""ResumableDistributedSampler and ResumableDataLoader as drop-ins: every way scripts use
``DistributedSampler`` and ``DataLoader`` (pytorch/examples, Lightning's loops) behaves the same,
and only the first pass that training consumes after a restore starts at the saved position."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from elastic_resume import ConfigError, ResumableDataLoader, ResumableDistributedSampler

N, WORLD, BATCH = 40, 2, 4


def dataset(n: int = N) -> TensorDataset:
    return TensorDataset(torch.arange(n))


def samplers(cls, rank=0, **kw):
    return cls(dataset(), num_replicas=WORLD, rank=rank, shuffle=True, seed=5, **kw)


def loader_over(sampler) -> DataLoader:
    return DataLoader(dataset(), batch_size=BATCH, sampler=sampler)


def flat(batches) -> list[int]:
    return [int(i) for (b,) in batches for i in b]


def tutorial_epochs(loader: DataLoader, epochs: range) -> dict[int, list[int]]:
    """pytorch/examples' ddp-tutorial-series shape: peek at the batch size, then set_epoch, then
    the epoch's loop."""
    seen = {}
    for epoch in epochs:
        b_sz = len(next(iter(loader))[0])
        assert b_sz == BATCH
        loader.sampler.set_epoch(epoch)
        seen[epoch] = flat(loader)
    return seen


def test_the_tutorials_peek_and_epoch_loop_see_what_distributed_sampler_gives():
    ours = tutorial_epochs(loader_over(samplers(ResumableDistributedSampler)), range(3))
    theirs = tutorial_epochs(loader_over(samplers(DistributedSampler)), range(3))
    assert ours == theirs
    assert all(len(v) == N // WORLD for v in ours.values())  # the peek consumed nothing: 5 of 5 steps


def test_second_pass_missing_set_epoch_and_len_match_distributed_sampler():
    ours, theirs = samplers(ResumableDistributedSampler), samplers(DistributedSampler)
    for s in (ours, theirs):
        s.set_epoch(1)
    assert len(ours) == len(theirs) == N // WORLD
    assert list(ours) == list(theirs) and list(ours) == list(theirs)  # a second iter() is a fresh pass
    first = iter(ours)
    peeked = [next(first) for _ in range(3)]
    assert list(ours) == list(theirs) and peeked == list(theirs)[:3]  # a live, abandoned pass does not shorten the next
    fresh = samplers(ResumableDistributedSampler)  # no set_epoch at all: epoch 0 every pass, as theirs
    assert list(fresh) == list(fresh) == list(samplers(DistributedSampler))
    assert len(loader_over(ours)) == len(loader_over(theirs)) == N // WORLD // BATCH


def test_only_the_first_consumed_pass_after_a_restore_starts_at_the_saved_position():
    trained = samplers(ResumableDistributedSampler)
    trained.set_epoch(2)
    loader = loader_over(trained)
    it = iter(loader)
    done = flat([next(it) for _ in range(2)])
    state = trained.state_dict()
    assert state["consumed"] == 2 * BATCH * WORLD

    resumed = samplers(ResumableDistributedSampler)
    resumed.load_state_dict(state)
    loader = loader_over(resumed)
    whole = samplers(ResumableDistributedSampler)
    whole.set_epoch(2)
    epoch = list(whole)
    seen = tutorial_epochs(loader, range(2, 4))  # peek, set_epoch(2) (same epoch), the loop; then epoch 3
    assert done + seen[2] == epoch  # neither repeated nor skipped, the peek notwithstanding
    assert seen[3] == tutorial_epochs(loader_over(samplers(DistributedSampler)), range(3, 4))[3]
    assert flat(loader) == seen[3]  # and the next pass of epoch 3 is a whole one again


def test_a_restore_taken_by_a_checkpoint_is_used_up_and_a_restore_at_an_epochs_end_starts_fresh():
    s = samplers(ResumableDistributedSampler)
    s.seek(N + 8)  # epoch 1, 8 samples in
    it = iter(s)
    next(it)
    assert s.state_dict()["consumed"] == 10  # a checkpoint of that pass: training consumed it
    assert len(list(s)) == N // WORLD  # the next pass is a whole one

    at_end = samplers(ResumableDistributedSampler)
    at_end.load_state_dict(dict(s.state_dict(), epoch=0, consumed=N))
    assert at_end.epoch_finished
    loader = loader_over(at_end)
    assert len(next(iter(loader))[0]) == BATCH  # no StopIteration from a peek at a finished epoch
    at_end.set_epoch(0)  # the script's loop for the restored epoch: it is done, nothing is retrained
    assert flat(loader) == []
    assert len(next(iter(loader))[0]) == BATCH
    at_end.set_epoch(1)
    theirs = samplers(DistributedSampler)
    theirs.set_epoch(1)
    assert flat(loader) == flat(loader_over(theirs))


@pytest.mark.parametrize("workers", [0, 2])
def test_resumable_dataloader_counts_what_the_loop_took_and_keeps_the_users_order(workers):
    plain = DataLoader(dataset(), batch_size=BATCH)  # not shuffled: ResumableDataLoader keeps that
    ours = ResumableDataLoader(dataset(), batch_size=BATCH, num_workers=workers,
                               sampler=None if workers else ResumableDistributedSampler(dataset(), 1, 0, shuffle=False))
    assert flat(ours) == flat(plain) and len(ours) == len(plain)
    shuffled = ResumableDataLoader(dataset(), batch_size=BATCH, shuffle=True, seed=3, num_workers=workers)
    order = flat(shuffled)
    assert sorted(order) == list(range(N)) and order != list(range(N))

    it = iter(shuffled)
    assert len(next(it)[0]) == BATCH  # a peek on its own iterator
    taken = flat([next(it) for _ in range(3)])
    state = shuffled.state_dict()
    assert state["consumed"] == 4 * BATCH  # batches handed out, not indices the workers fetched ahead
    again = ResumableDataLoader(dataset(), batch_size=BATCH, shuffle=True, seed=3, num_workers=workers)
    again.load_state_dict(state)
    assert len(next(iter(again))[0]) == BATCH
    assert flat(again) == order[4 * BATCH:] and taken == order[BATCH:4 * BATCH]


def test_resumable_dataloader_names_what_contradicts():
    with pytest.raises(ConfigError, match=r"shuffle=False.*sampler's shuffle=True"):
        ResumableDataLoader(dataset(), batch_size=2, shuffle=False,
                            sampler=ResumableDistributedSampler(dataset(), 1, 0, shuffle=True))
    with pytest.raises(ConfigError, match="got RandomSampler"):
        ResumableDataLoader(dataset(), sampler=torch.utils.data.RandomSampler(dataset()))
