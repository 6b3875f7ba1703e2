"""The spike vote: the one place that does a per-step collective.

Each rank puts its local verdicts and, for every step since the last check, its loss and
gradient norm into one small tensor::

    [spike, nonfinite, preempt, stop,  (loss, grad_norm, grad_norm_present, nonfinite) per step,
     SUM check fields]

and one ``all_reduce(SUM)`` combines them. The vote is a declared schema: a detector that needs
more than sums declares a :class:`Field` with its reduction (MAX, or MIN, sent as the MAX of the
negation) and passes it to ``submit`` on the checks that carry it; those travel in a second small
tensor with one ``all_reduce(MAX)``, on those checks only. Detection adds fields, not
positions. Every rank then derives the same decision from the same reduced numbers: the global
(mean over ranks) loss of every step, which the guard's global detectors judge identically on
every rank, and the ranks' own flags. With ``lag=1`` (default)
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import membership
from ..contract import StrEnum
from ..errors import ConfigError
from .detectors import Verdict

FLAGS = ("spike", "nonfinite", "preempt", "stop")
PER_STEP = ("loss", "grad_norm", "grad_norm_present", "nonfinite")


class Reduce(StrEnum):
    SUM = "sum"
    MAX = "max"
    MIN = "min"


@dataclass(frozen=True)
class Field:
    """A named value a check may carry, and how the ranks' values combine."""

    name: str
    reduce: Reduce


#: The replicated parameters' rotating digest (``replicas``): equal MIN and MAX, equal replicas.
REPLICA_DIGEST_MIN = Field("replica_digest_min", Reduce.MIN)
REPLICA_DIGEST_MAX = Field("replica_digest_max", Reduce.MAX)
#: Each rank's busy time per step (``stragglers``): the slowest, packed with its rank, and the sum.
STEP_BUSY_MAX = Field("step_busy_max", Reduce.MAX)
STEP_BUSY_SUM = Field("step_busy_sum", Reduce.SUM)

Checks = Mapping[Field, "float | torch.Tensor"]


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
    checks: Mapping[str, float] = field(default_factory=dict)
    """The reduced value of every :class:`Field` this check carried, by name."""

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
    def replicas_disagree(self) -> bool:
        """The replicated parameters' digests differed between ranks (MIN != MAX)."""
        low, high = self.checks.get(REPLICA_DIGEST_MIN.name), self.checks.get(REPLICA_DIGEST_MAX.name)
        return low is not None and high is not None and low != high

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
        # "auto": the membership's "vote" group (gloo, over every rank, made again when the job
        # is re-formed), read at each use; under NCCL the default group.
        self._group = group
        if group == "auto" and self._dist and self._dist.get_world_size() > 1 and self._dist.get_backend() != "nccl":
            membership.current().named_group("vote")  # collective: every rank builds its guard now
        self.device = torch.device("cpu")
        if self._dist and self._dist.get_backend(self.group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._pending: _InFlight | None = None

    @property
    def group(self) -> Any:
        """The group the vote reduces over (None: the default group)."""
        if self._group != "auto":
            return self._group
        if self._dist is None or self._dist.get_backend() == "nccl":
            return None
        return membership.current().named_group("vote")

    @property
    def world_size(self) -> int:
        return self._dist.get_world_size(self.group) if self._dist else 1

    def submit(self, step: int, *, values: list[tuple[int, float, float | None]], spike: bool, nonfinite: bool,
               preempt: bool, stop: bool, checks: Checks | None = None) -> VoteResult | None:
        """``values``: ``(step, loss, grad_norm or None)`` of this rank for every step since the
        last check (the same steps on every rank). ``checks``: declared fields this check carries
        (the same fields on every rank; a value may be a 0-dim tensor on any device)."""
        row = [float(spike), float(nonfinite), float(preempt), float(stop)]
        for _, loss, grad_norm in values:
            bad = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
            row += [0.0 if bad else loss, 0.0 if bad or grad_norm is None else grad_norm,
                    0.0 if bad or grad_norm is None else 1.0, float(bad)]
        fields = sorted(checks or {}, key=lambda f: f.name)
        summed = [f for f in fields if f.reduce == Reduce.SUM]
        maxed = [f for f in fields if f.reduce != Reduce.SUM]
        row += [float(checks[f]) for f in summed]  # type: ignore[index]
        t = torch.tensor(row, dtype=torch.float64, device=self.device)
        m = None
        if maxed:
            assert checks is not None
            m = torch.stack([_as_float64(checks[f], self.device) * (-1 if f.reduce == Reduce.MIN else 1)
                             for f in maxed])
        group = self.group  # looked up once per check: the membership's, as of now
        world = self._dist.get_world_size(group) if self._dist else 1
        flight = _InFlight(step, tuple(s for s, _, _ in values), world, t, summed, m, maxed)
        if self._dist and world > 1:
            async_op = self.lag > 0
            flight.works.append(self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=group,
                                                      async_op=async_op))
            if m is not None:
                flight.works.append(self._dist.all_reduce(m, op=self._dist.ReduceOp.MAX, group=group,
                                                          async_op=async_op))
        if self.lag == 0:
            return self._finish(flight)
        previous, self._pending = self._pending, flight
        return self._finish(previous) if previous else None

    def flush(self) -> VoteResult | None:
        """The result of the check still in flight, if any (before a save, rollback or exit)."""
        previous, self._pending = self._pending, None
        return self._finish(previous) if previous else None

    def discard(self) -> None:
        """Drop the check in flight (its step lies on a timeline that was just rolled back);
        the collectives are still completed so every rank stays in step."""
        if self._pending is not None:
            self._pending.wait()
        self._pending = None

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on every rank), over the vote's group: for the rare
        follow-up that names which rank a reduced field singled out."""
        t = t.to(self.device)
        if not self._dist or self.world_size < 2:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._dist.all_gather(out, t, group=self.group)
        return out

    def _finish(self, flight: _InFlight) -> VoteResult:
        flight.wait()
        step, steps, world = flight.step, flight.steps, flight.world_size
        numbers = flight.sums.tolist()
        spike, nonfinite, preempt, stop = numbers[:len(FLAGS)]
        values = []
        for i, s in enumerate(steps):
            loss, grad, present, bad = numbers[len(FLAGS) + i * len(PER_STEP):len(FLAGS) + (i + 1) * len(PER_STEP)]
            good = world - round(bad)
            values.append(StepValues(step=s, loss=loss / good if good else float("nan"),
                                     grad_norm=grad / present if present >= 0.5 else None, nonfinite=round(bad)))
        return VoteResult(
            step=step, world_size=world, mean_loss=values[-1].loss if values else float("nan"),
            spikes=round(spike), nonfinite=round(nonfinite), preempt=round(preempt), stop=round(stop),
            quorum=self.quorum.needed(world), values=tuple(values), checks=flight.reduced(numbers),
        )


def _as_float64(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A field's value as float64 on the vote's device (a device tensor is not read back)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)


@dataclass
class _InFlight:
    """One check's tensors and the collectives reducing them."""

    step: int
    steps: tuple[int, ...]
    world_size: int  # of the group it was reduced over
    sums: torch.Tensor
    summed: list[Field]
    maxes: torch.Tensor | None
    maxed: list[Field]
    works: list[Any] = field(default_factory=list)

    def wait(self) -> None:
        for work in self.works:
            if work is not None:
                work.wait()
        self.works = []

    def reduced(self, sums: list[float]) -> dict[str, float]:
        """Every declared field's reduced value by name; ``sums``: the SUM tensor, already read."""
        out = dict(zip((f.name for f in self.summed), sums[len(sums) - len(self.summed):]))
        if self.maxes is not None:
            for f, v in zip(self.maxed, self.maxes.tolist()):
                out[f.name] = -v if f.reduce == Reduce.MIN else v
        return out
