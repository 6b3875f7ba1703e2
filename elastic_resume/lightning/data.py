"""A ``DataLoader`` whose position Lightning checkpoints and restores itself.

Lightning saves the ``state_dict()`` of every training dataloader that has one in its loop
state and loads it back before the first batch of a resumed run. This loader's state is its
``ResumableDistributedSampler``'s, counted in batches *handed to the training loop*: worker
processes that fetch ahead do not move it, so the batch after a mid-epoch resume is the one the
interrupted run would have trained on next.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from ..training.sampler import ResumableDistributedSampler


class ResumableDataLoader(DataLoader):
    """``DataLoader(dataset, sampler=ResumableDistributedSampler(...), batch_size=...)`` with
    ``state_dict``/``load_state_dict``. Use it with ``Trainer(use_distributed_sampler=False)``
    (the sampler already shards the data across ranks)."""

    def __init__(self, dataset: Dataset[Any], *, sampler: ResumableDistributedSampler, batch_size: int = 1,
                 **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableDistributedSampler):
            raise ConfigError(
                f"ResumableDataLoader needs sampler=ResumableDistributedSampler(...), got {type(sampler).__name__} "
                "(Lightning swaps in its own sampler unless Trainer(use_distributed_sampler=False))"
            )
        if kwargs.get("batch_sampler") is not None:
            raise ConfigError("ResumableDataLoader counts positions by batch_size; batch_sampler is not supported")
        sampler.auto_track = False  # counted here, per batch delivered, not per index prefetched
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: ResumableDistributedSampler = self.sampler  # type: ignore[assignment]
        assert self.batch_size is not None
        for batch in super().__iter__():
            sampler.advance(self.batch_size)  # consumed once handed out: a checkpoint after this step includes it
            yield batch

    def __len__(self) -> int:
        """Batches per rank in a whole epoch (not what is left of it): Lightning counts the
        batches of a resumed epoch from where the checkpoint left off."""
        sampler: ResumableDistributedSampler = self.sampler  # type: ignore[assignment]
        assert self.batch_size is not None
        n, w = sampler.dataset_len, sampler.num_replicas
        per_rank = n // w if sampler.drop_last else math.ceil(n / w)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)  # type: ignore[attr-defined]
