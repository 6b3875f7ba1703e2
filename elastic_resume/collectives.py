"""Where ranks agree: the few collectives checkpointing needs, behind one small interface.

``LocalGroup`` is a world of one (plain scripts, the CLI, Lightning's single writer).
``TorchGroup`` runs over ``torch.distributed`` on a dedicated gloo group with its own timeout, so
checkpoint agreement never waits on (or is blocked by) the training backend, works the same under
NCCL, and no collective can hang forever. :func:`on_rank0` is the one way a decision made by
rank 0 alone (listing a root, reading health records, deleting) reaches every rank, errors
included, so no rank waits for an answer that never comes.

Objects travel between ranks of one job with ``broadcast_object_list`` (pickle): the peers are
the job's own processes, never bytes read from storage.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch

from .errors import ElasticResumeError

T = TypeVar("T")


class Group(Protocol):
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...
    def all_gather_object(self, obj: Any) -> list[Any]: ...
    def all_reduce_min(self, values: list[int]) -> list[int]: ...
    def broadcast_tensors(self, tensors: list[torch.Tensor], sources: list[int]) -> None:
        """Overwrite each CPU tensor (the same shapes on every rank) with its source rank's (a
        rank of this group); the broadcasts run concurrently."""


class InGroup:
    """Mixin for an object that acts in ``self.group``: its rank and world size are read through
    the group on every use, never copied (a re-formed job changes them, see ``membership``)."""

    group: Group

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size


class LocalGroup:
    """A world of one process."""

    rank = 0
    world_size = 1

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def all_reduce_min(self, values: list[int]) -> list[int]:
        return list(values)

    def broadcast_tensors(self, tensors: list[torch.Tensor], sources: list[int]) -> None:
        pass


class TorchGroup:
    """Collectives over a gloo process group created for checkpoint coordination. A live handle:
    rank and world size are read from the group on every use, and :meth:`rebuild` (run by
    ``Membership.reconfigure``) swaps in a group over the re-formed world."""

    def __init__(self, timeout_s: float = 600.0, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.timeout_s = timeout_s
        self.group = group if group is not None else self._new_group()

    def _new_group(self) -> Any:
        return self._dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))

    def rebuild(self) -> None:
        """Collective over the new world: a new group replaces the old one (which is gone)."""
        self.group = self._new_group()

    @property
    def rank(self) -> int:
        """This process's rank in the group (not the global rank: they differ in a subgroup)."""
        return int(self._dist.get_rank(self.group))

    @property
    def world_size(self) -> int:
        return int(self._dist.get_world_size(self.group))

    def _global(self, rank: int) -> int:
        """torch names a collective's source by its global rank."""
        return int(self._dist.get_global_rank(self.group, rank))

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        self._dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_reduce_min(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN, group=self.group)
        return [int(v) for v in t.tolist()]

    def broadcast_tensors(self, tensors: list[torch.Tensor], sources: list[int]) -> None:
        # Issued together, gloo moves the files of different owners at the same time.
        works = [self._dist.broadcast(t, src=self._global(src), group=self.group, async_op=True)
                 for t, src in zip(tensors, sources)]
        for work in works:
            work.wait()


def agree_on(group: Group, ok: bool, value: int = 0) -> tuple[bool, bool]:
    """Collective, one ``all_reduce(MIN)`` of ``[ok, value, -value]``: whether every rank is ok,
    and whether every rank holds the same ``value`` (its MIN equals its MAX). The one way ranks
    agree on a candidate (the same commit everywhere) or on a phase (everyone ready, the same
    kind of state everywhere)."""
    all_ok, low, neg_high = group.all_reduce_min([1 if ok else 0, value, -value])
    return bool(all_ok), low == -neg_high


def process_group(group: Group) -> Any:
    """The torch process group behind ``group`` (None for a world of one: torch's default)."""
    return getattr(group, "group", None)


def on_rank0(group: Group, work: Callable[[], T], *, error: Callable[[str], Exception], what: str) -> T:
    """Collective: run ``work`` on rank 0 and return its result on every rank. If it fails, every
    rank raises ``error(f"{what}: {reason}")`` (on rank 0 chained to the original exception),
    instead of rank 0 raising alone while the others wait for a broadcast until their timeout."""
    outcome: tuple[str, Any] | None = None
    failure: BaseException | None = None
    if group.rank == 0:
        try:
            outcome = ("ok", work())
        except Exception as e:  # noqa: BLE001 - every rank must hear it, or the others hang
            failure = e
            reason = str(e) if isinstance(e, (ElasticResumeError, OSError)) else f"{type(e).__name__}: {e}"
            outcome = ("error", f"{what}: {reason}")
    status, payload = group.broadcast_object(outcome)
    if status == "error":
        raise error(payload) from failure
    return payload
