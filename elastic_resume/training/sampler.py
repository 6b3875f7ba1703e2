"""A resumable distributed sampler: a drop-in for ``torch.utils.data.DistributedSampler`` whose
position is kept in *global* sample units, so a resume (also at another world size) neither
repeats nor skips a sample.

The epoch's order is a permutation of the dataset fixed by (seed, epoch). ``consumed`` counts how
many positions of that order all ranks together have used; the rest is dealt out round-robin
(rank r takes remaining[r::world_size]), so after every rank took k samples exactly the first
``consumed + k * world_size`` positions are used, a contiguous prefix at any world size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from ..errors import ConfigError, StateError


class ResumableDistributedSampler(Sampler[int]):
    """Like ``DistributedSampler`` (same arguments), plus ``state_dict``/``load_state_dict``.

    Position tracking: by default each index handed out counts as consumed, which is exact for a
    ``DataLoader`` with ``num_workers=0``. With worker processes the loader fetches ahead; pass
    ``auto_track=False`` and call ``advance(n)`` with the number of samples this rank trained on
    after each step instead.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        *,
        auto_track: bool = True,
    ) -> None:
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            ready = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"invalid rank {rank} for num_replicas {num_replicas}")
        self.dataset_len = len(dataset)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.auto_track = auto_track
        self.epoch = 0
        self.consumed = 0  # global positions of this epoch's order already used

    # -- order ---------------------------------------------------------------------------------
    def epoch_order(self, epoch: int | None = None) -> list[int]:
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            return torch.randperm(self.dataset_len, generator=g).tolist()
        return list(range(self.dataset_len))

    def _remaining(self) -> list[int]:
        rest = self.epoch_order()[self.consumed :]
        w = self.num_replicas
        if self.drop_last:
            rest = rest[: len(rest) - len(rest) % w]
        elif rest and len(rest) % w:
            pad = w - len(rest) % w  # as DistributedSampler: wrap around to even out the ranks
            rest = rest + (rest * math.ceil(pad / len(rest)))[:pad]
        return rest

    def __iter__(self) -> Iterator[int]:
        mine = self._remaining()[self.rank :: self.num_replicas]
        for index in mine:
            if self.auto_track:
                self.consumed = min(self.dataset_len, self.consumed + self.num_replicas)
            yield index

    def __len__(self) -> int:
        return len(self._remaining()) // self.num_replicas

    # -- position ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; calling it again for the epoch a checkpoint is in keeps the position."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def advance(self, local_samples: int) -> None:
        """Count ``local_samples`` (trained on by this rank in the last step) as consumed on every
        rank; for loaders that prefetch (``auto_track=False``)."""
        self.consumed = min(self.dataset_len, self.consumed + local_samples * self.num_replicas)

    @property
    def position(self) -> int:
        """Absolute position in the stream of epochs: ``epoch * len(dataset) + consumed``."""
        return self.epoch * self.dataset_len + self.consumed

    def seek(self, position: int) -> None:
        """Jump to an absolute position (skipping data after a rollback); the next iterator
        starts there."""
        self.epoch, self.consumed = divmod(max(0, position), self.dataset_len)

    @property
    def epoch_finished(self) -> bool:
        return self.consumed >= self.dataset_len - (self.dataset_len % self.num_replicas if self.drop_last else 0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "shuffle": self.shuffle,
            "dataset_len": self.dataset_len, "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dataset_len"] != self.dataset_len:
            raise StateError(
                f"sampler was saved over a dataset of {state['dataset_len']} samples but the dataset now "
                f"has {self.dataset_len}; the saved position cannot be mapped"
            )
        if (state["seed"], state["shuffle"]) != (self.seed, self.shuffle):
            raise StateError(
                f"sampler was saved with seed={state['seed']} shuffle={state['shuffle']} but is now "
                f"seed={self.seed} shuffle={self.shuffle}; the epoch order would differ"
            )
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
