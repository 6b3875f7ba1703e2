"""A resumable distributed sampler: a drop-in for ``torch.utils.data.DistributedSampler`` whose
position is kept in *global* sample units, so a resume (also at another world size) neither
repeats nor skips a sample.

The epoch's order is a permutation of the dataset fixed by (seed, epoch). ``consumed`` counts how
many positions of that order all ranks together have used; the rest is dealt out round-robin
(rank r takes remaining[r::world_size]), so after every rank took k samples exactly the first
``consumed + k * world_size`` positions are used, a contiguous prefix at any world size.

Passes behave as ``DistributedSampler``'s: every ``iter()`` is a fresh pass over the epoch, so a
peek at one batch (``next(iter(loader))``), a second loop in the same epoch or a missing
``set_epoch`` do what they do there. The one difference is the first pass after a restore
(``load_state_dict``) or a ``seek``: it starts at the saved position. A pass counts as that
first pass only once training is seen consuming it: it ran to its end, or a checkpoint took its
position (``state_dict``) after it moved. A pass the script dropped before either (a peek at the
batch size) leaves the saved position for the next one, so peeking never skips data.
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
        self.consumed = 0  # global positions of this epoch's order used by the latest pass
        self._resume_at: int | None = None  # where the next pass starts, after a restore or a seek
        self._passes = 0  # passes begun: only the latest one moves the position
        self._pass_start: int | None = None  # where the latest pass began, when from _resume_at
        self._epoch_confirmed = False  # set_epoch named the restored epoch after the restore

    # -- order ---------------------------------------------------------------------------------
    def epoch_order(self, epoch: int | None = None) -> list[int]:
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            return torch.randperm(self.dataset_len, generator=g).tolist()
        return list(range(self.dataset_len))

    def _remaining(self, start: int) -> list[int]:
        order = self.epoch_order()
        rest = order[start:]
        w = self.num_replicas
        if self.drop_last:
            rest = rest[: len(rest) - len(rest) % w]
        elif rest and len(rest) % w:
            # As DistributedSampler: wrap around to the head of the epoch's order to even out the
            # ranks. The head, not the resumed pass's first sample: a resumed pass pads with what
            # the uninterrupted one did.
            pad = w - len(rest) % w
            rest = rest + (order * math.ceil(pad / len(order)))[:pad]
        return rest

    def _pass_size(self, start: int) -> int:
        """``len(self._remaining(start))`` by arithmetic: no permutation drawn for a length."""
        rest, w = self.dataset_len - start, self.num_replicas
        if self.drop_last:
            return rest - rest % w
        return rest + (-rest) % w if rest > 0 else 0

    def __iter__(self) -> Iterator[int]:
        # A generator: the pass begins at the loader's first request, not when iter() is called.
        start = self._resume_at if self._resume_at is not None else 0
        if not self._pass_size(start) and not self._epoch_confirmed:
            # A restore at the end of an epoch, and the script has not yet said this epoch is the
            # one it trains (set_epoch): a peek at the batch size gets a fresh pass, as from a
            # DistributedSampler. After set_epoch of the finished epoch the pass is empty: the
            # epoch is done, and the script's loop moves on to the next.
            start = 0
        self._passes += 1
        me = self._passes
        self._pass_start = start if self._resume_at is not None else None
        self.consumed = start
        for index in self._remaining(start)[self.rank :: self.num_replicas]:
            if self.auto_track and me == self._passes:
                self.consumed = min(self.dataset_len, self.consumed + self.num_replicas)
            yield index
        if me == self._passes:
            self._resume_at, self._epoch_confirmed = None, False  # the first pass after the restore ran to its end

    def __len__(self) -> int:
        """Samples this rank draws in a whole epoch, as ``DistributedSampler``: schedules sized
        from ``len(loader)`` are the same in a resumed run (a resumed pass yields fewer)."""
        return self._pass_size(0) // self.num_replicas

    # -- position ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; calling it again for the epoch a checkpoint is in keeps the position."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0
            self._resume_at = None
        self._epoch_confirmed = self._resume_at is not None

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
        self._resume_at, self._epoch_confirmed = self.consumed, False

    @property
    def epoch_finished(self) -> bool:
        return self.consumed >= self.dataset_len - (self.dataset_len % self.num_replicas if self.drop_last else 0)

    def state_dict(self) -> dict[str, Any]:
        if self._pass_start is not None and self.consumed != self._pass_start:
            # A checkpoint of a pass that moved from the saved position: training consumed it.
            self._resume_at = self._pass_start = None
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
        self._resume_at, self._epoch_confirmed = self.consumed, False
        self._pass_start = None
