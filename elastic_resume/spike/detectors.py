"""Loss-spike detectors: plain objects fed floats, one verdict per value. No torch, no I/O.

Each detector watches the loss or the gradient norm (``watch``), ignores its first ``warmup``
values, and keeps the state it needs (windows, averages) in ``state_dict()`` so a resumed run
judges exactly as the original would have. A value judged a spike is not absorbed into the
statistics: a baseline must not learn to accept the very spike it reported.

Where a detector judges (its ``scope``): ``NonFinite`` always on each rank's own values (one
rank's NaN is the job's NaN); ``Plateau`` always on the global loss (a plateau is a property of
the run, not of one rank's batch); the others on whatever the guard judges (``judge="global"``
by default: the loss averaged over all ranks, so every rank judges the same number and the
false-positive rate does not grow with the world size; ``judge="rank"``: each rank's own).
"""

from __future__ import annotations

import abc
import logging
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..contract import StrEnum
from ..errors import ConfigError

log = logging.getLogger("elastic_resume")

WATCH = ("loss", "grad_norm")


class Judge(StrEnum):
    """Which loss a detector judges."""

    GLOBAL = "global"  #: the loss averaged over all ranks (the same number, hence verdict, everywhere)
    RANK = "rank"  #: each rank's own loss


class Anchor(StrEnum):
    """Which healthy checkpoint a rollback goes back to."""

    NEWEST = "newest"  #: the newest one at least ``margin`` steps before the onset
    LOWEST_LOSS = "lowest_loss"  #: of those, the one with the lowest recorded loss (plateaus)


@dataclass(frozen=True)
class Verdict:
    spike: bool = False
    stop: bool = False
    reason: str = ""
    plateau: bool = False
    """A plateau, not a spike: the rollback follows the plateau's own anchor and skip rules."""
    rollback_to: str = Anchor.NEWEST
    """``newest`` healthy checkpoint old enough, or the one with the ``lowest_loss`` recorded."""
    skip_data: bool = True
    """Whether the rollback skips the data window (spikes: the policy decides; plateaus: asked)."""

    def __bool__(self) -> bool:
        return self.spike or self.stop


OK = Verdict()


@dataclass(kw_only=True)
class Detector(abc.ABC):  # noqa: B024 - a family for config parsers; every hook has a working default
    """Base: subclasses implement ``_judge`` (and ``_absorb`` for stateful baselines).

    Declared an abstract base (``abc.ABC``) so that configuration parsers treat ``Detector`` as a
    family of classes: jsonargparse (``LightningCLI``) then accepts any detector by
    ``class_path`` where a signature says ``list[Detector]``."""

    watch: str = "loss"
    warmup: int = 0
    seen: int = field(default=0, init=False)
    scope: ClassVar[Judge | None] = None  # where it always judges; None: as the guard judges

    def __post_init__(self) -> None:
        if self.watch not in WATCH:
            raise ConfigError(f"{type(self).__name__}: watch must be one of {WATCH} (got {self.watch!r})")
        if self.warmup < 0:
            raise ConfigError(f"{type(self).__name__}: warmup must be >= 0 (got {self.warmup})")

    @property
    def name(self) -> str:
        return f"{type(self).__name__}({self.watch})"

    def update(self, value: float, step: int) -> Verdict:
        verdict = OK
        if math.isfinite(value) and self.seen >= self.warmup:
            verdict = self._judge(value, step)
        if not verdict.spike and math.isfinite(value):
            self._absorb(value)
        self.seen += 1
        return verdict

    def _judge(self, value: float, step: int) -> Verdict:
        return OK

    def on_rollback(self, anchor: int) -> None:  # noqa: B027 - optional hook
        """Called after a rollback restored this detector's state from the anchor at step
        ``anchor``: a detector whose clock is recovery state (``Plateau``) restarts it here."""

    def _absorb(self, value: float) -> None:  # noqa: B027 - optional hook: stateless detectors keep nothing
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])


@dataclass(kw_only=True)
class Threshold(Detector):
    """Spike when the value exceeds ``max_value``."""

    max_value: float

    def _judge(self, value: float, step: int) -> Verdict:
        if value > self.max_value:
            return Verdict(spike=True, reason=f"{self.watch} {value:.6g} > threshold {self.max_value:.6g}")
        return OK


@dataclass(kw_only=True)
class _Windowed(Detector):
    window: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 2:
            raise ConfigError(f"{type(self).__name__}: window must be >= 2 (got {self.window})")
        self.values: deque[float] = deque(maxlen=self.window)
        self.warmup = max(self.warmup, self.window // 2)

    def _absorb(self, value: float) -> None:
        self.values.append(value)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "values": list(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.values = deque((float(v) for v in state["values"]), maxlen=self.window)


@dataclass(kw_only=True)
class MovingAverageRatio(_Windowed):
    """Spike when the value exceeds ``ratio`` times the mean of the last ``window`` values."""

    ratio: float = 2.0

    def _judge(self, value: float, step: int) -> Verdict:
        mean = statistics.fmean(self.values)
        if mean > 0 and value > self.ratio * mean:
            return Verdict(spike=True, reason=f"{self.watch} {value:.6g} > {self.ratio} x moving average {mean:.6g}")
        return OK


@dataclass(kw_only=True)
class MaxRatio(_Windowed):
    """Spike when the value exceeds ``ratio`` times the *largest* of the last ``window`` values:
    higher than anything the run showed lately, by a margin. The default detector.

    Judging against the window's maximum, not a spread, is what keeps clean runs clean: a
    converging regression's batch losses are heavy-tailed (7x their median now and then at 8
    samples a rank) and its spread shrinks with the loss, so a z-score calls its ordinary
    outliers spikes; a curriculum stage or a warm-up moves the level by a step, not past 3x the
    recent maximum. Megatron checks 10x the running maximum; 3x over 128 steps still catches a
    10x spike wherever batch losses vary by less than about 3x (cross-entropy of classifiers and
    language models: all of them in ``benchmarks/bench_false_rollbacks.py``). The window counts
    from the first value (no half-window warm-up): early in a run the maximum is the starting
    loss, which only makes it more cautious."""

    ratio: float = 3.0
    window: int = 128
    warmup: int = 16

    def __post_init__(self) -> None:
        warmup = self.warmup
        super().__post_init__()
        self.warmup = warmup  # its own, not window // 2: see the class docstring
        if not self.ratio > 1:
            raise ConfigError(f"MaxRatio: ratio must be > 1 (got {self.ratio})")

    def _judge(self, value: float, step: int) -> Verdict:
        if not self.values:
            return OK
        top = max(self.values)
        if top > 0 and value > self.ratio * top:
            return Verdict(spike=True, reason=f"{self.watch} {value:.6g} is {value / top:.1f}x the highest of the last "
                                              f"{len(self.values)} steps ({top:.6g}; median {statistics.median(self.values):.6g})"
                                              f" > {self.ratio}x")
        return OK


@dataclass(kw_only=True)
class EMARatio(Detector):
    """Spike when the value exceeds ``ratio`` times an exponential moving average."""

    ratio: float = 2.0
    alpha: float = 0.05
    ema: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"EMARatio: alpha must be in (0, 1] (got {self.alpha})")
        self.warmup = max(self.warmup, 1)

    def _judge(self, value: float, step: int) -> Verdict:
        if self.ema is not None and self.ema > 0 and value > self.ratio * self.ema:
            return Verdict(spike=True, reason=f"{self.watch} {value:.6g} > {self.ratio} x EMA {self.ema:.6g}")
        return OK

    def _absorb(self, value: float) -> None:
        self.ema = value if self.ema is None else (1 - self.alpha) * self.ema + self.alpha * value

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ema = state["ema"]


@dataclass(kw_only=True)
class RobustZScore(_Windowed):
    """Spike when (value - median) / (1.4826 * MAD) over the window exceeds ``z``: robust to the
    occasional outlier and to slow trends that a mean/std would chase."""

    z: float = 6.0
    window: int = 100

    def _judge(self, value: float, step: int) -> Verdict:
        med = statistics.median(self.values)
        mad = statistics.median(abs(v - med) for v in self.values) * 1.4826
        scale = max(mad, 1e-12, abs(med) * 1e-3)
        score = (value - med) / scale
        if score > self.z:
            return Verdict(spike=True, reason=f"{self.watch} {value:.6g} has robust z-score {score:.1f} > {self.z}")
        return OK


@dataclass(kw_only=True)
class CUSUM(Detector):
    """One-sided CUSUM on standardized deviations from an EMA baseline: fires on a sustained
    upward shift that no single value would flag. ``k`` is the allowed slack and ``h`` the
    decision threshold, both in standard deviations. The noise level comes from successive
    differences (half their mean square), which a slowly falling loss curve does not inflate."""

    k: float = 0.5
    h: float = 8.0
    alpha: float = 0.05
    mean: float | None = field(default=None, init=False)
    var: float = field(default=0.0, init=False)
    prev: float | None = field(default=None, init=False)
    s: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.warmup = max(self.warmup, 10)

    def _judge(self, value: float, step: int) -> Verdict:
        if self.mean is None:
            return OK
        std = math.sqrt(max(self.var, 1e-24)) or 1e-12
        std = max(std, abs(self.mean) * 1e-3, 1e-12)
        self.s = max(0.0, self.s + (value - self.mean) / std - self.k)
        if self.s > self.h:
            s, self.s = self.s, 0.0
            return Verdict(spike=True, reason=f"{self.watch} drifted up: CUSUM {s:.1f} > {self.h}")
        return OK

    def _absorb(self, value: float) -> None:
        if self.mean is None:
            self.mean = self.prev = value
            return
        assert self.prev is not None
        step_var = (value - self.prev) ** 2 / 2
        self.var = step_var if self.var == 0.0 else (1 - self.alpha) * self.var + self.alpha * step_var
        self.mean += self.alpha * (value - self.mean)
        self.prev = value

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mean": self.mean, "var": self.var, "prev": self.prev, "s": self.s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mean, self.var, self.prev, self.s = state["mean"], float(state["var"]), state["prev"], float(state["s"])


@dataclass(kw_only=True)
class NonFinite(Detector):
    """NaN or Inf (in the loss or the gradient norm) is always a spike, warm-up or not; judged
    on each rank's own values (a mean over ranks would hide which one broke)."""

    scope: ClassVar[Judge | None] = Judge.RANK

    def update(self, value: float, step: int) -> Verdict:
        self.seen += 1
        if not math.isfinite(value):
            return Verdict(spike=True, reason=f"{self.watch} is {value}")
        return OK




@dataclass(kw_only=True)
class Plateau(Detector):
    """"Loss still above ``above`` after ``after_steps`` steps", judged on the global loss
    smoothed over ``window`` steps (or over each whole epoch with ``window="epoch"``), never on
    one batch.

    When it holds it asks for a rollback (``action="rollback"``, usually with the policy's
    ``lr_scale`` < 1) or stops the run (``action="stop"``). Its clock is recovery state: after a
    rollback to step A it waits until step A + ``after_steps`` at the new LR before it may fire
    again (the anchor's copy of this detector, which had not fired yet, does not bring the old
    clock back), so a plateau that keeps coming back spends the rollback budget and stops the run
    with exit code 76. ``rollback_to="lowest_loss"`` goes back to the healthy checkpoint with the
    lowest recorded loss instead of the newest; data is skipped only with ``skip_data=True``
    (a plateau is not bad data)."""

    above: float
    after_steps: int
    window: int | str = 50
    action: str = "rollback"
    rollback_to: str = Anchor.NEWEST
    skip_data: bool = False
    scope: ClassVar[Judge | None] = Judge.GLOBAL
    origin: int = field(default=0, init=False)  # the step the after_steps clock counts from
    values: deque[float] = field(default_factory=deque, init=False)
    epoch: int | None = field(default=None, init=False)  # window="epoch": the epoch being summed

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.action not in ("rollback", "stop"):
            raise ConfigError(f"Plateau: action must be 'rollback' or 'stop' (got {self.action!r})")
        if self.rollback_to not in tuple(Anchor):
            raise ConfigError(f"Plateau: rollback_to must be one of {', '.join(a.value for a in Anchor)} "
                              f"(got {self.rollback_to!r})")
        self.rollback_to = Anchor(self.rollback_to)
        if self.after_steps < 0:
            raise ConfigError(f"Plateau: after_steps must be >= 0 (got {self.after_steps})")
        if self.window != "epoch" and (not isinstance(self.window, int) or self.window < 1):
            raise ConfigError(f"Plateau: window must be a number of steps >= 1 or 'epoch' (got {self.window!r})")
        self.values = deque(maxlen=None if self.window == "epoch" else int(self.window))

    def update(self, value: float, step: int, epoch: int | None = None) -> Verdict:
        self.seen += 1
        if not math.isfinite(value):
            return OK  # NonFinite's business; a NaN must not poison the mean
        if self.window == "epoch":
            if epoch is None:
                raise ConfigError("Plateau(window='epoch') needs the epoch: pass guard.step(..., epoch=E)")
            finished = list(self.values) if self.epoch is not None and epoch != self.epoch else None
            if finished is not None:
                self.values.clear()
            self.values.append(value)
            self.epoch = epoch
            if not finished:
                return OK  # judged once per epoch, when its last step is known
            mean, over = statistics.fmean(finished), f"epoch {epoch - 1}"
        else:
            self.values.append(value)
            if len(self.values) < min(int(self.window), max(1, self.after_steps)):
                return OK
            mean, over = statistics.fmean(self.values), f"the last {len(self.values)} steps"
        if step - self.origin < self.after_steps or mean <= self.above:
            return OK
        since = "the start" if self.origin == 0 else f"the rollback to step {self.origin}"
        reason = (f"{self.watch} averaged over {over} is {mean:.6g}, still above {self.above:.6g} "
                  f"{step - self.origin} steps after {since}")
        self.origin = step  # without a rollback (ignored, or action="stop"), wait as long again
        return Verdict(spike=self.action == "rollback", stop=self.action == "stop", reason=reason, plateau=True,
                       rollback_to=self.rollback_to, skip_data=self.skip_data)

    def on_rollback(self, anchor: int) -> None:
        self.origin = anchor
        self.values.clear()
        self.epoch = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "origin": self.origin, "values": list(self.values), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.origin = int(state.get("origin", 0))  # absent in checkpoints of the fire-once Plateau
        self.values.clear()
        self.values.extend(float(v) for v in state.get("values", ()))
        epoch = state.get("epoch")
        self.epoch = None if epoch is None else int(epoch)


def default_detectors() -> list[Detector]:
    """NaN/Inf in the loss or the gradient norm anywhere, and a loss more than 3x the highest of
    the last 128 (``MaxRatio``): 0 false rollbacks per 10,000 clean steps on every loss shape of
    ``benchmarks/bench_false_rollbacks.py``. (0.3 used ``RobustZScore(window=50, z=8)``, which
    rolled back clean regressions; a checkpoint of its state resumes with the new one fresh.)"""
    return [NonFinite(watch="loss"), NonFinite(watch="grad_norm"), MaxRatio()]


def judged_where(detector: Detector, judge: Judge) -> Judge:
    """Where ``detector`` judges when the guard judges ``judge``."""
    return detector.scope or judge


class DetectorBank:
    """Runs a list of detectors on one step's values; reports the first firing verdict."""

    checkpoint_per_rank = True  # NonFinite's counters (and per-rank judging) are each rank's own
    reshardable = True

    def __init__(self, detectors: list[Detector] | None = None) -> None:
        self.detectors = list(detectors) if detectors is not None else default_detectors()

    def update(self, step: int, loss: float, grad_norm: float | None = None, *,
               where: Callable[[Detector], bool] | None = None, epoch: int | None = None) -> tuple[Verdict, str]:
        """Feed the detectors ``where`` selects (all by default) this step's values."""
        spike = stop = None
        for d in self.detectors:
            if where is not None and not where(d):
                continue
            value = loss if d.watch == "loss" else grad_norm
            if value is None:
                continue
            v = d.update(float(value), step, epoch) if isinstance(d, Plateau) else d.update(float(value), step)
            if v.stop and stop is None:
                stop = (v, d.name)
            elif v.spike and spike is None:
                spike = (v, d.name)
        return stop or spike or (OK, "")

    def on_rollback(self, anchor: int) -> None:
        for d in self.detectors:
            d.on_rollback(anchor)

    def state_dict(self) -> dict[str, Any]:
        return {"detectors": [[d.name, d.state_dict()] for d in self.detectors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["detectors"]
        names = [d.name for d in self.detectors]
        if [n for n, _ in saved] == names:
            for d, (_, s) in zip(self.detectors, saved):
                d.load_state_dict(s)
            return
        # The detectors changed since the checkpoint (a new default, a new setting): their state
        # is a baseline of recent losses, so each one still present by name keeps its own and
        # the others start fresh. Refusing to resume over it would turn a tuning into an outage.
        by_name: dict[str, Any] = {}
        for n, s in saved:
            by_name.setdefault(n, s)
        fresh = [d.name for d in self.detectors if d.name not in by_name]
        for d in self.detectors:
            if d.name in by_name:
                d.load_state_dict(by_name.pop(d.name))
        log.warning("detectors changed since the checkpoint (saved %s, now %s): %s start fresh",
                    [n for n, _ in saved], names, ", ".join(fresh) or "none")

    def reshard(self, saved_any_rank: dict[str, Any], rank: int, world_size: int) -> None:
        """After a world-size change, start from rank 0's statistics (a warm baseline)."""
        self.load_state_dict(saved_any_rank)
