"""A ``DataLoader`` whose position is counted where training consumes it.

Written as ``DataLoader(dataset, batch_size=..., shuffle=...)`` is: it builds the
``ResumableDistributedSampler`` itself, shuffled only when the loader it replaces was (Lightning
infers its own sampler's ``shuffle`` the same way), or takes one through ``sampler=``.

Its position is counted in batches *handed to the loop*: worker processes that fetch ahead do not
move it, so the batch after a mid-epoch resume is the one the interrupted run would have trained
on next. Lightning saves the ``state_dict()`` of every training dataloader that has one in its
loop state and loads it back before the first batch of a resumed run; a plain loop puts the
loader (or its sampler) in the checkpointed state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset

from .. import heartbeat
from ..errors import ConfigError
from .sampler import ResumableDistributedSampler

_END = object()  # the underlying iterator is exhausted


class ResumableDataLoader(DataLoader):
    """A drop-in for ``DataLoader(dataset, batch_size, shuffle, ...)`` over a
    ``ResumableDistributedSampler``, with ``state_dict``/``load_state_dict``.

    ``shuffle`` defaults to ``False`` as ``DataLoader``'s does; ``seed`` fixes the shuffled order
    (the same on every rank, as ``DistributedSampler``'s). Under Lightning use it with
    ``Trainer(use_distributed_sampler=False)``: the sampler already shards the data across ranks.
    """

    def __init__(self, dataset: Dataset[Any], batch_size: int | None = 1, shuffle: bool | None = None,
                 sampler: ResumableDistributedSampler | None = None, *, seed: int = 0, **kwargs: Any) -> None:
        if kwargs.get("batch_sampler") is not None:
            raise ConfigError("ResumableDataLoader counts positions by batch_size; batch_sampler is not supported")
        if batch_size is None or batch_size < 1:
            raise ConfigError(f"ResumableDataLoader needs batch_size >= 1, got {batch_size}")
        if sampler is None:
            sampler = ResumableDistributedSampler(dataset, shuffle=bool(shuffle), seed=seed)  # type: ignore[arg-type]
        elif not isinstance(sampler, ResumableDistributedSampler):
            raise ConfigError(
                f"ResumableDataLoader needs sampler=ResumableDistributedSampler(...) or none, got "
                f"{type(sampler).__name__} (Lightning swaps in its own sampler unless "
                "Trainer(use_distributed_sampler=False))"
            )
        elif shuffle is not None and bool(shuffle) != sampler.shuffle:
            raise ConfigError(f"ResumableDataLoader(shuffle={shuffle}) contradicts its sampler's shuffle={sampler.shuffle}; "
                              "give one of them")
        sampler.auto_track = False  # counted here, per batch delivered, not per index prefetched
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: ResumableDistributedSampler = self.sampler  # type: ignore[assignment]
        assert self.batch_size is not None
        batches = super().__iter__()
        while True:
            with heartbeat.section(heartbeat.Section.DATA):  # a loader that blocks is named as such
                batch = next(batches, _END)
            if batch is _END:
                return
            sampler.advance(self.batch_size)  # consumed once handed out: a checkpoint after this step includes it
            yield batch

    def __len__(self) -> int:
        """Batches per rank in a whole epoch (not what is left of it): Lightning counts the
        batches of a resumed epoch from where the checkpoint left off, and a schedule sized from
        ``len(loader)`` stays the same in a resumed run."""
        sampler: ResumableDistributedSampler = self.sampler  # type: ignore[assignment]
        assert self.batch_size is not None
        per_rank = len(sampler)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)  # type: ignore[attr-defined]
