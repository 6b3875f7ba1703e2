"""The spike vote: the one place that does a per-step collective.

Each rank puts its loss and its local verdicts into one small tensor
``[loss_sum, spike, nonfinite, preempt, stop]`` and one ``all_reduce(SUM)`` combines them; every
rank then derives the same decision from the same reduced numbers. With ``lag=1`` (default) the
reduction is launched asynchronously and read at the next check, so its latency hides behind a
training step instead of stalling it.

Where it runs: under NCCL, on the default process group with the tensor on the current CUDA
device (one tiny kernel on the stream the step already uses). Under gloo, on a gloo group of its
own: gloo runs a group's collectives one after another, so on the default group the vote would
queue in front of the next step's gradient all-reduce and add its round trip to every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError

FIELDS = ("loss_sum", "spike", "nonfinite", "preempt", "stop")


@dataclass(frozen=True)
class Quorum:
    """How many ranks must see a spike: ``any``, ``majority``, or a fraction in (0, 1]."""

    rule: str | float = "any"

    def __post_init__(self) -> None:
        if isinstance(self.rule, str):
            if self.rule not in ("any", "majority"):
                raise ConfigError(f"quorum must be 'any', 'majority' or a fraction in (0, 1] (got {self.rule!r})")
        elif not 0 < float(self.rule) <= 1:
            raise ConfigError(f"quorum fraction must be in (0, 1] (got {self.rule})")

    def needed(self, world_size: int) -> int:
        if self.rule == "any":
            return 1
        if self.rule == "majority":
            return world_size // 2 + 1
        return max(1, math.ceil(float(self.rule) * world_size))


@dataclass(frozen=True)
class VoteResult:
    step: int
    world_size: int
    mean_loss: float
    spikes: int
    nonfinite: int
    preempt: int
    stop: int
    quorum: int

    @property
    def spike(self) -> bool:
        """Agreed spike: NaN/Inf on any rank always counts; other verdicts need the quorum."""
        return self.nonfinite > 0 or self.spikes >= self.quorum

    @property
    def trouble(self) -> bool:
        """Any rank saw anything, quorum or not (used to mark checkpoints unhealthy)."""
        return self.spikes > 0 or self.nonfinite > 0


class Vote:
    """One small all_reduce per check. ``submit`` returns the result of the check ``lag`` checks
    ago (or None while none is due)."""

    def __init__(self, *, quorum: Quorum | str | float = "any", lag: int = 1, group: Any = "auto") -> None:
        if lag not in (0, 1):
            raise ConfigError(f"vote lag must be 0 (read at once) or 1 (read at the next check), got {lag}")
        self.quorum = quorum if isinstance(quorum, Quorum) else Quorum(quorum)
        self.lag = lag
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        if group == "auto":
            group = None
            if self._dist and self._dist.get_world_size() > 1 and self._dist.get_backend() != "nccl":
                group = self._dist.new_group(backend="gloo")  # collective: every rank builds its guard
        self.group = group
        self.world_size = self._dist.get_world_size(group) if self._dist else 1
        self.device = torch.device("cpu")
        if self._dist and self._dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._pending: tuple[int, torch.Tensor, Any] | None = None

    def submit(self, step: int, *, loss: float, spike: bool, nonfinite: bool, preempt: bool, stop: bool) -> VoteResult | None:
        t = torch.tensor([loss if math.isfinite(loss) else 0.0, float(spike), float(nonfinite), float(preempt), float(stop)],
                         dtype=torch.float64, device=self.device)
        work = None
        if self._dist and self.world_size > 1:
            work = self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self.group, async_op=self.lag > 0)
        if self.lag == 0:
            return self._finish(step, t, None)
        previous, self._pending = self._pending, (step, t, work)
        return self._finish(*previous) if previous else None

    def flush(self) -> VoteResult | None:
        """The result of the check still in flight, if any (before a save, rollback or exit)."""
        previous, self._pending = self._pending, None
        return self._finish(*previous) if previous else None

    def discard(self) -> None:
        """Drop the check in flight (its step lies on a timeline that was just rolled back);
        the collective is still completed so every rank stays in step."""
        if self._pending is not None and self._pending[2] is not None:
            self._pending[2].wait()
        self._pending = None

    def _finish(self, step: int, t: torch.Tensor, work: Any) -> VoteResult:
        if work is not None:
            work.wait()
        loss_sum, spike, nonfinite, preempt, stop = (float(v) for v in t.tolist())
        return VoteResult(
            step=step, world_size=self.world_size, mean_loss=loss_sum / self.world_size,
            spikes=round(spike), nonfinite=round(nonfinite), preempt=round(preempt), stop=round(stop),
            quorum=self.quorum.needed(self.world_size),
        )
