"""Where ranks agree: the few collectives the checkpoint manager needs, behind one small interface.

``LocalGroup`` is a world of one (plain scripts, the CLI). ``TorchGroup`` runs over
``torch.distributed`` on a dedicated gloo group with its own timeout, so checkpoint agreement never
waits on (or is blocked by) the training backend, works the same under NCCL, and no collective
can hang forever.
"""

from __future__ import annotations

import datetime
from typing import Any, Protocol

import torch


class Group(Protocol):
    rank: int
    world_size: int

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...
    def all_gather_object(self, obj: Any) -> list[Any]: ...
    def all_reduce_min(self, values: list[int]) -> list[int]: ...


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


class TorchGroup:
    """Collectives over a gloo process group created for checkpoint coordination."""

    def __init__(self, timeout_s: float = 600.0, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group if group is not None else dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        self._dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_reduce_min(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN, group=self.group)
        return [int(v) for v in t.tolist()]


def default_group(timeout_s: float = 600.0) -> Group:
    """TorchGroup when a default process group is initialised with more than one rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchGroup(timeout_s)
    return LocalGroup()
