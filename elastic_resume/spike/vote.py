"""The spike vote: the one place that does a per-step collective.

Each rank puts its local verdicts and, for every step since the last check, its loss and
gradient norm into one small tensor::

    [spike, nonfinite, preempt, stop,  (loss, grad_norm, grad_norm_present, nonfinite) per step]

and one ``all_reduce(SUM)`` combines them; every rank then derives the same decision from the
same reduced numbers: the global (mean over ranks) loss of every step, which the guard's global
detectors judge identically on every rank, and the ranks' own flags. With ``lag=1`` (default)
the reduction is launched asynchronously and read at the next check, so its latency hides behind
a training step instead of stalling it. The steps per check are the same on every rank (every
rank calls the guard with the same steps), so the tensors have the same length.

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

from ..errors import ConfigError
from .detectors import Verdict

FLAGS = ("spike", "nonfinite", "preempt", "stop")
PER_STEP = ("loss", "grad_norm", "grad_norm_present", "nonfinite")


@dataclass(frozen=True)
class StepValues:
    """One step's values as the vote reports them: means over the ranks."""

    step: int
    loss: float
    grad_norm: float | None
    nonfinite: int  # ranks whose loss or gradient norm was NaN/Inf (left out of the means)


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
    values: tuple[StepValues, ...] = ()
    verdict: Verdict | None = None
    """What the global detectors found in ``values`` (the same on every rank), set by the guard."""

    @property
    def spike(self) -> bool:
        """Agreed spike: NaN/Inf on any rank always counts, and so does a global verdict; a
        per-rank verdict needs the quorum."""
        return (self.nonfinite > 0 or self.spikes >= self.quorum
                or (self.verdict is not None and self.verdict.spike))

    @property
    def plateau_only(self) -> bool:
        """The rollback is for a plateau alone (its own anchor and data rules apply)."""
        return (self.verdict is not None and self.verdict.plateau and self.nonfinite == 0
                and self.spikes < self.quorum)

    @property
    def trouble(self) -> bool:
        """Any rank saw anything, quorum or not (used to mark checkpoints unhealthy); a plateau
        is no trouble: the checkpoints taken during it are as good as training got."""
        global_spike = self.verdict is not None and self.verdict.spike and not self.verdict.plateau
        return self.spikes > 0 or self.nonfinite > 0 or global_spike


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
        self._pending: tuple[int, tuple[int, ...], torch.Tensor, Any] | None = None

    def submit(self, step: int, *, values: list[tuple[int, float, float | None]], spike: bool, nonfinite: bool,
               preempt: bool, stop: bool) -> VoteResult | None:
        """``values``: ``(step, loss, grad_norm or None)`` of this rank for every step since the
        last check (the same steps on every rank)."""
        row = [float(spike), float(nonfinite), float(preempt), float(stop)]
        for _, loss, grad_norm in values:
            bad = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
            row += [0.0 if bad else loss, 0.0 if bad or grad_norm is None else grad_norm,
                    0.0 if bad or grad_norm is None else 1.0, float(bad)]
        t = torch.tensor(row, dtype=torch.float64, device=self.device)
        steps = tuple(s for s, _, _ in values)
        work = None
        if self._dist and self.world_size > 1:
            work = self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self.group, async_op=self.lag > 0)
        if self.lag == 0:
            return self._finish(step, steps, t, None)
        previous, self._pending = self._pending, (step, steps, t, work)
        return self._finish(*previous) if previous else None

    def flush(self) -> VoteResult | None:
        """The result of the check still in flight, if any (before a save, rollback or exit)."""
        previous, self._pending = self._pending, None
        return self._finish(*previous) if previous else None

    def discard(self) -> None:
        """Drop the check in flight (its step lies on a timeline that was just rolled back);
        the collective is still completed so every rank stays in step."""
        if self._pending is not None and self._pending[3] is not None:
            self._pending[3].wait()
        self._pending = None

    def _finish(self, step: int, steps: tuple[int, ...], t: torch.Tensor, work: Any) -> VoteResult:
        if work is not None:
            work.wait()
        numbers = t.tolist()
        spike, nonfinite, preempt, stop = numbers[:len(FLAGS)]
        values = []
        for i, s in enumerate(steps):
            loss, grad, present, bad = numbers[len(FLAGS) + i * len(PER_STEP):len(FLAGS) + (i + 1) * len(PER_STEP)]
            good = self.world_size - round(bad)
            values.append(StepValues(step=s, loss=loss / good if good else float("nan"),
                                     grad_norm=grad / present if present >= 0.5 else None, nonfinite=round(bad)))
        return VoteResult(
            step=step, world_size=self.world_size, mean_loss=values[-1].loss if values else float("nan"),
            spikes=round(spike), nonfinite=round(nonfinite), preempt=round(preempt), stop=round(stop),
            quorum=self.quorum.needed(self.world_size), values=tuple(values),
        )
