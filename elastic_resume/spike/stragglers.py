"""Stragglers: a rank persistently slower than the rest, found from per-rank step times that ride
on the vote (declared fields: the MAX, with the rank that holds it, next to the SUM).

Under DDP every rank's wall time per step is the same: the gradient all-reduce makes the fast
ranks wait for the slow one, inside ``backward``. What differs is the time each rank spends
*not waiting*. :class:`BusyClock` measures it without touching the training: a gradient hook on
the few parameters nearest the input (the last whose gradients ``backward`` computes) marks when
this rank's own backward is done, and an optimizer step pre-hook marks when the synchronized
gradients came back; the time between is the wait for the other ranks. A rank's busy time is its
step's wall time minus that wait. The straggler waits least, so its busy time is the largest.

Without DDP (no gradient synchronization) the wait is zero and busy time is the wall time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError

#: Step times travel as ``round(seconds * 1e4) * 2**RANK_BITS + rank`` in one float64 MAX field:
#: exact up to about 5 days per step and a million ranks, and the MAX names the slowest rank.
RANK_BITS = 20
_TICKS = 1e4


def pack(seconds: float, rank: int) -> float:
    return float(min(round(max(0.0, seconds) * _TICKS), 2**32 - 1) * 2**RANK_BITS + rank)


def unpack(value: float) -> tuple[float, int]:
    whole = int(value)
    return (whole >> RANK_BITS) / _TICKS, whole & ((1 << RANK_BITS) - 1)


#: Gradient hooks go on this many parameters of each module, counted from the input side.
_HOOKED = 2


class BusyClock:
    """This rank's busy time per step: the step's wall time minus the time it waited at the
    gradient synchronization (see the module's docstring)."""

    def __init__(self, state: Mapping[str, Any], modules: Mapping[str, Any]) -> None:
        self._grads_done: float | None = None
        self._waited = 0.0
        self._handles: list[Any] = []
        for value in modules.values():
            if isinstance(value, torch.nn.Module):
                params = [p for p in value.parameters() if p.requires_grad][:_HOOKED]
                self._handles += [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]
        for value in state.values():
            if isinstance(value, torch.optim.Optimizer):
                self._handles.append(value.register_step_pre_hook(self._on_optimizer_step))

    def _on_grad(self, _param: torch.Tensor) -> None:
        self._grads_done = time.perf_counter()

    def _on_optimizer_step(self, *_args: Any) -> None:
        if self._grads_done is not None:
            self._waited += time.perf_counter() - self._grads_done
            self._grads_done = None

    def busy(self, wall_s: float) -> float:
        """The busy part of a step that took ``wall_s``; starts the next step's count."""
        waited, self._waited = self._waited, 0.0
        return max(0.0, wall_s - waited)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass(frozen=True)
class Straggler:
    """A rank slower than the others' mean by ``ratio`` for ``checks`` checks in a row."""

    step: int
    rank: int
    ratio: float
    busy_s: float  #: its busy time per step (mean since the last check)
    others_s: float  #: the other ranks' mean busy time per step
    checks: int


class StragglerWatch:
    """Pure: the reduced (MAX, SUM) of each check in, a straggler out once it is persistent
    (``patience`` checks in a row, the same rank, slower than the others' mean by ``factor``).
    One report per episode: it is said again only after the rank caught up in between."""

    def __init__(self, factor: float, patience: int) -> None:
        if not factor > 1.0:
            raise ConfigError(f"straggler_factor must be above 1 (got {factor})")
        if patience < 1:
            raise ConfigError(f"straggler_patience must be >= 1 (got {patience})")
        self.factor = factor
        self.patience = patience
        self._rank: int | None = None
        self._ratios: list[float] = []
        self._reported = False

    def observe(self, step: int, packed_max: float, total: float, world_size: int) -> Straggler | None:
        if world_size < 2:
            return None
        slowest, rank = unpack(packed_max)
        others = (total - slowest) / (world_size - 1)
        ratio = slowest / others if others > 0 else float("inf") if slowest > 0 else 1.0
        if ratio < self.factor:
            self._rank, self._ratios, self._reported = None, [], False
            return None
        if rank != self._rank:
            self._rank, self._ratios, self._reported = rank, [], False
        self._ratios.append(ratio)
        if len(self._ratios) < self.patience or self._reported:
            return None
        self._reported = True
        return Straggler(step=step, rank=rank, ratio=round(statistics.median(self._ratios[-self.patience:]), 3),
                         busy_s=round(slowest, 4), others_s=round(others, 4), checks=len(self._ratios))
