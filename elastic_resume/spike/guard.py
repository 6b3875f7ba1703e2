"""SpikeGuard: the loss-spike guard for a plain PyTorch loop.

A few lines around an existing loop::

    guard = SpikeGuard(manager, state, sampler=sampler, policy=RollbackPolicy(margin=100, skip_after=200))
    step = guard.start()                        # restore (or start at 0)
    while step < total:
        ... loss = train_step(next(batches)) ...
        step += 1
        outcome = guard.step(step, loss.item(), grad_norm=gn, save=step % 100 == 0)
        if outcome.rolled_back:                 # every rank, same iteration
            step, batches = outcome.step, iter(loader)

Per step: this rank's NaN/Inf check (and, with ``judge="rank"``, its detectors), then one small
collective (the vote, read one step late by default) that also yields the loss averaged over all
ranks, then the detectors on that global loss (``judge="global"``, the default: the same number
on every rank, so the same verdict, and a false-positive rate that does not grow with the world
size), then the pure policy. A rollback happens in-process on every rank in the same
iteration: newer checkpoints on the abandoned timeline are retired, the anchor is restored into
the live objects, the bad data window is skipped, the LR optionally scaled, and the anchor is
re-committed with the new recovery state so a requeue neither repeats nor forgets it.

The guard reaches its checkpoints only through :class:`~elastic_resume.spike.backend.CheckpointBackend`
(a ``CheckpointManager``, or the Lightning callback's trainer backend).
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import torch

from .. import _torch_compat, heartbeat, preemption, replicas
from ..contract import Env, Event, StrEnum
from ..errors import ConfigError, GaveUpError, RegroupError, ReplicaDivergenceError
from ..training.sampler import ResumableDistributedSampler
from .backend import CheckpointBackend
from .detectors import Anchor, Detector, DetectorBank, Judge, Plateau, judged_where
from .policy import Action, ActionKind, Recovery, RollbackDecision, RollbackPolicy, decide, lowest_loss
from .replay import ReplayCheck, recorded_steps
from .stragglers import BusyClock, Straggler, StragglerWatch, pack
from .vote import REPLICA_DIGEST_MAX, REPLICA_DIGEST_MIN, STEP_BUSY_MAX, STEP_BUSY_SUM, Quorum, Vote, VoteResult

RECOVERY_KEY = "spike_guard"
DETECTORS_KEY = "spike_detectors"
#: What scaling the LR after a rollback changes in the drift fingerprint: recovery, not drift.
LR_DRIFT = ("optimizer.*.initial_lr", "optimizer.*.lr")


@dataclass(kw_only=True)
class GuardOptions:
    """How a :class:`SpikeGuard` (and Lightning's ``ElasticResume``) detects spikes and reacts."""

    detectors: list[Detector] | None = None
    """Spike detectors (default: ``default_detectors()``: NaN/Inf in loss and gradient norm, and a
    loss over 3x the highest of the last 128 steps)."""
    policy: RollbackPolicy | None = None
    """What a rollback does (margin, data skipped, LR scale, budget); default ``RollbackPolicy()``."""
    quorum: str | float = "any"
    """With ``judge="rank"``: how many ranks must see a spike (``any``, ``majority``, a fraction)."""
    vote_every: int = 1
    """Vote every this many steps (the detectors still see every step)."""
    lag: int = 1
    """1: read each vote one check later, so its latency hides behind a step; 0: read at once."""
    health_window: int = 10
    """Checkpoints taken within this many steps after any trouble are unhealthy: never an anchor."""
    judge: str = Judge.GLOBAL.value  # a plain string as default: configuration files (YAML) can write it
    """``global``: judge the loss averaged over all ranks; ``rank``: each rank's own, with ``quorum``."""
    replica_check_every: int = 10
    """Every this many steps a digest of a slice of the replicated (DDP) parameters rides on the
    vote, and replicas that differ are rolled back (silent divergence; 0: off)."""
    replica_slices: int = 4
    """The replicated parameters are digested a slice at a time, each one every this many checks:
    a divergence is found within ``replica_check_every * replica_slices`` steps at most."""
    straggler_check_every: int = 10
    """Every this many steps each rank's mean busy time per step rides on the vote (the MAX with
    its rank, and the SUM), to find a persistent straggler (0: off)."""
    straggler_factor: float = 1.5
    """A rank whose busy time is this many times the other ranks' mean is slow at that check."""
    straggler_patience: int = 3
    """Checks in a row the same rank must be slow before ``straggler_detected``."""
    exclude_diverged: bool = False
    """A rank whose replica differs from the majority's (three ranks or more: with two, no rank can
    be told apart) is treated like a failed node: its node leaves the job and the others restart
    from the newest committed step, which agreed (needs a node to spare, as ``exclude_stragglers``);
    off: the guard rolls back and keeps every node."""
    exclude_stragglers: bool = False
    """Treat a persistent straggler like a failed node: every rank saves the current step, the
    straggler's node leaves the job and the others go on without it (needs ``--nnodes MIN:MAX``
    with nodes to spare; without, the straggler is only reported)."""

    def __post_init__(self) -> None:
        if self.vote_every < 1:
            raise ConfigError(f"SpikeGuard(vote_every=...) must be >= 1 (got {self.vote_every})")
        if self.judge not in tuple(Judge):
            raise ConfigError(f"SpikeGuard(judge=...) must be one of {', '.join(j.value for j in Judge)} "
                              f"(got {self.judge!r})")
        self.judge = Judge(self.judge)
        if self.health_window < 0:
            raise ConfigError(f"SpikeGuard(health_window=...) must be >= 0 (got {self.health_window})")
        if self.replica_check_every < 0:
            raise ConfigError(f"SpikeGuard(replica_check_every=...) must be >= 0 (0: off; got {self.replica_check_every})")
        if self.replica_slices < 1:
            raise ConfigError(f"SpikeGuard(replica_slices=...) must be >= 1 (got {self.replica_slices})")
        if self.straggler_check_every < 0:
            raise ConfigError(f"SpikeGuard(straggler_check_every=...) must be >= 0 (0: off; got "
                              f"{self.straggler_check_every})")
        StragglerWatch(self.straggler_factor, self.straggler_patience)  # validates
        Quorum(self.quorum)  # validates


class Outcome(StrEnum):
    """What every rank must do after ``SpikeGuard.step``."""

    CONTINUE = "continue"  #: go on training
    ROLLBACK = "rollback"  #: the state was rolled back: continue after ``StepOutcome.step``
    PREEMPTED = "preempted"  #: a preemption save was committed: exit with 75


@dataclass(frozen=True)
class StepOutcome:
    kind: Outcome = Outcome.CONTINUE
    step: int | None = None  # after a rollback: the step training continues after

    @property
    def rolled_back(self) -> bool:
        return self.kind == Outcome.ROLLBACK

    @property
    def preempted(self) -> bool:
        return self.kind == Outcome.PREEMPTED


CONTINUE = StepOutcome()


def scale_learning_rate(state: MutableMapping[str, Any], factor: float) -> None:
    """Multiply every optimizer's LR by ``factor``, including what schedulers recompute it from."""
    if factor == 1.0:
        return
    for value in state.values():
        if isinstance(value, torch.optim.Optimizer):
            for group in value.param_groups:
                group["lr"] = group["lr"] * factor
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * factor
        elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
            value.base_lrs = [b * factor for b in value.base_lrs]
            _torch_compat.set_last_lr(value, [lr * factor for lr in value.get_last_lr()])


class SpikeGuard:
    """Detect loss spikes on every rank, agree in one collective, roll back in-process."""

    def __init__(
        self,
        checkpoints: CheckpointBackend,
        state: MutableMapping[str, Any],
        options: GuardOptions | None = None,
        *,
        sampler: ResumableDistributedSampler | None = None,
        group: Any = "auto",
        on_event: Callable[[dict[str, Any]], None] | None = None,
        **settings: Any,
    ) -> None:
        """``checkpoints``: a ``CheckpointManager`` (or another :class:`CheckpointBackend`).
        ``options`` (or the same names as keyword settings, see :class:`GuardOptions`) say how
        spikes are found and handled; ``sampler`` makes rollbacks skip the bad data; ``group``
        is where the vote runs ("auto": a gloo group of its own, or NCCL's default group)."""
        if options is not None and settings:
            raise ConfigError(f"SpikeGuard: pass GuardOptions or keyword settings, not both "
                              f"(got options and {', '.join(sorted(settings))})")
        options = options if options is not None else GuardOptions(**settings)
        self.options = options
        self.judge = Judge(options.judge)
        self.checkpoints = checkpoints
        self.state = state
        self.sampler = sampler
        self.policy = options.policy or RollbackPolicy()
        self.bank = DetectorBank(options.detectors)
        self.recovery = Recovery()
        self.vote = Vote(quorum=Quorum(options.quorum), lag=options.lag, group=group)
        self.vote_every = options.vote_every
        self.health_window = options.health_window
        self.on_event = on_event
        state[RECOVERY_KEY] = self.recovery
        state[DETECTORS_KEY] = self.bank
        if self.policy.lr_scale != 1.0:
            _torch_compat.require("scaling the learning rate after a rollback (RollbackPolicy.lr_scale)")
            # The guard itself moves the LR; that is recovery, not drift between runs.
            checkpoints.allow_recovery_drift(LR_DRIFT)
        self._flags = {"spike": False, "nonfinite": False, "stop": False}
        self._preempt = False
        self._last_loss = float("nan")
        self._last_trouble: int | None = None
        self._positions: dict[int, int] = {}
        self._committed: list[tuple[int, bool, float | None]] = []  # (step, healthy, loss) of this timeline
        self._values: list[tuple[int, float, float | None]] = []  # this rank's steps since the last vote
        self._epochs: dict[int, int | None] = {}  # step -> epoch, for Plateau(window="epoch")
        self._global_losses: deque[float] = deque(maxlen=max(1, self.health_window))  # recorded with checkpoints
        self._step_clock: float | None = None
        self._replay: ReplayCheck | None = None  # rank 0, after a restart: the steps trained again
        #: Where the replicated parameters are found (Lightning points it at the LightningModule).
        self.replica_state: MutableMapping[str, Any] | dict[str, Any] = state
        self._rotation: replicas.Rotation | None = None
        self._steps_since_digest = 0
        self._samples: dict[int, replicas.Sample] = {}  # vote step -> the digest it carried, until read
        self._diverged: dict[int, replicas.Disagreement] = {}  # vote step -> what the vote found
        self._busy_clock: BusyClock | None = None  # built at the first step (Lightning adds optimizers late)
        self._busy: list[float] = []  # this rank's busy seconds per step since the last timing check
        self._steps_since_timing = 0
        self._stragglers = StragglerWatch(options.straggler_factor, options.straggler_patience)
        self._slow: dict[int, Straggler] = {}  # vote step -> a persistent straggler to exclude
        # Votes read outside step() (settle(), right before a checkpoint taken by someone else,
        # e.g. Lightning's ModelCheckpoint): acted on at the next step().
        self._deferred: list[VoteResult] = []
        # SIGUSR1/SIGTERM now ask for a save through the vote instead of killing the process.
        preemption.register_consumer()

    # -- events -------------------------------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> None:
        record = self.checkpoints.events.emit(event, **fields)
        if self.on_event is not None:
            self.on_event(record)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> int:
        """Restore the newest verified checkpoint (0 if none). With ``restart_from_scratch``,
        a fresh run first commits step 0 so there is always something to roll back to."""
        restored = self.checkpoints.restore(self.state)
        redone = self.attach(restored)
        return redone if redone is not None else (restored or 0)

    def attach(self, restored: int | None) -> int | None:
        """Take up training after a restore done by someone else (``restored`` is the step, or
        None for a fresh run): learn which checkpoints exist and their health, and finish a
        rollback a crash interrupted. Returns the step training continues from when that
        rollback was carried out now (its anchor), else None."""
        self._committed = self.checkpoints.checkpoint_health()
        self._step_clock = time.monotonic()
        if restored is None:
            if self.policy.restart_from_scratch:
                self.save(0)
            return None
        decision = RollbackDecision.from_json(self.checkpoints.recorded_decision())
        if decision is None or self.recovery.rollbacks > decision.recovery.get("rollbacks", 0):
            # None recorded, or its re-commit landed (the state restored carries it): the steps
            # after the restored one are trained again as they were; check that they give the same.
            self._watch_replay(restored)
            return None
        if restored < decision.anchor:
            self.emit(Event.ROLLBACK_ABANDONED, step=restored, anchor=decision.anchor, onset=decision.onset,
                      reason=f"a rollback to step {decision.anchor} was decided before the last stop, but the run "
                             f"resumed from the older step {restored}: it judges the steps after it afresh")
            return None
        self.emit(Event.ROLLBACK_RESUMED, step=restored, anchor=decision.anchor, onset=decision.onset,
                  reason=f"the rollback from step {decision.onset} to step {decision.anchor} was decided before the "
                         "last stop and had not been committed: carrying it out now")
        return self._carry_out(decision).step

    def _watch_replay(self, restored: int) -> None:
        if self.checkpoints.rank != 0:
            return
        recorded = recorded_steps(self.checkpoints.events.path, restored)
        self._replay = ReplayCheck(restored, recorded) if recorded else None

    def _end_replay(self) -> None:
        """A rollback cuts the replay short: say what matched so far."""
        if self._replay is not None:
            self._say(self._replay.finish())
            self._replay = None

    def _say(self, event: tuple[str, dict[str, Any]] | None) -> None:
        if event is not None:
            self.emit(event[0], **event[1])

    def _protect_anchor(self, step: int) -> None:
        """Keep out of retention's reach every checkpoint a spike at ``step`` or later could roll
        back to: the newest healthy one at least ``margin`` steps old (today's anchor) and the
        healthy ones younger than that (tomorrow's anchors)."""
        limit = step - self.policy.margin
        healthy = [s for s, ok, _ in self._committed if ok]
        old = [s for s in healthy if s <= limit]
        keep = {s for s in healthy if s > limit} | ({max(old)} if old else set())
        if old and any(isinstance(d, Plateau) and d.rollback_to == Anchor.LOWEST_LOSS for d in self.bank.detectors):
            # A plateau's anchor, which decide() may pick over the newest.
            chosen = lowest_loss(old, {s: loss for s, _, loss in self._committed})
            if chosen is not None:
                keep.add(chosen)
        if self.policy.restart_from_scratch and 0 in healthy:
            keep.add(0)
        self.checkpoints.protect(keep)

    def request_save(self) -> None:
        """Ask every rank to save at the next vote (preemption); set from a signal handler."""
        self._preempt = True

    @property
    def clip_scale(self) -> float:
        """Multiply your gradient-clipping threshold by this (lowered by rollbacks)."""
        return self.recovery.clip_scale

    def healthy(self, step: int) -> bool:
        return self._last_trouble is None or step - self._last_trouble > self.health_window

    def save(self, step: int, *, metadata: dict[str, Any] | None = None, blocking: bool = True) -> None:
        meta, health = self.record_checkpoint(step, metadata)
        self.checkpoints.save(step, self.state, metadata=meta, blocking=blocking, health=health)

    def record_checkpoint(self, step: int, metadata: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Record that a checkpoint of ``step`` is being taken now: from here on the guard counts
        it among the checkpoints it may roll back to (and protects the anchors that follow from
        that). Returns the (metadata, health) to store with it."""
        meta = {"loss": self._last_loss, **(metadata or {})}
        if self.sampler is not None:
            meta["samples_seen"] = self.sampler.position
        loss = statistics.fmean(self._global_losses) if self._global_losses else None
        healthy = self.healthy(step)
        health = {"healthy": healthy, "last_trouble_step": self._last_trouble,
                  "rollbacks": self.recovery.rollbacks, "loss": loss}
        self._committed = [c for c in self._committed if c[0] != step] + [(step, healthy, loss)]
        self._protect_anchor(step)
        return meta, health

    def settle(self) -> None:
        """Read the vote still in flight (every rank, together). Call it right before a checkpoint
        that ``step(save=True)`` does not take, so a spike it carries marks that checkpoint
        unhealthy; what the vote asks for (rollback, preemption save) happens at the next
        ``step()``."""
        result = self._receive(self.vote.flush())
        if result is not None:
            self._deferred.append(result)

    # -- the per-step check -------------------------------------------------------------------
    def step(
        self,
        step: int,
        loss: float,
        grad_norm: float | None = None,
        *,
        save: bool = False,
        blocking: bool = True,
        metadata: dict[str, Any] | None = None,
        epoch: int | None = None,
    ) -> StepOutcome:
        """Feed this step's loss (and gradient norm); returns what every rank must do now.
        ``epoch`` is needed by ``Plateau(window="epoch")`` only.

        ``save=True`` checkpoints this step, after reading this step's vote too (one extra wait
        on save steps only), so a checkpoint is never taken, nor marked healthy, while a spike
        it contains is still being counted."""
        heartbeat.beat(step)
        loss = float(loss)
        self._last_loss = loss
        grad_norm = None if grad_norm is None else float(grad_norm)
        self._record_step(step, loss, grad_norm)
        if self._replay is not None:
            self._say(self._replay.observe(step, loss, grad_norm))
            if self._replay.done:
                self._replay = None
        if self.recovery.cooldown_left > 0:
            self.recovery.cooldown_left -= 1
        nonfinite = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
        verdict, name = self.bank.update(step, loss, grad_norm, where=self._local)
        if verdict or nonfinite:
            self._flags["spike"] |= verdict.spike
            self._flags["stop"] |= verdict.stop
            self._flags["nonfinite"] |= nonfinite  # one rank's NaN is the job's, detector or not
            self._last_trouble = step
            self.emit(Event.SPIKE_DETECTED, step=step, detector=name or "non-finite", reason=verdict.reason or
                      f"loss {loss}, gradient norm {grad_norm}", loss=loss, judged="rank")
        self._values.append((step, loss, grad_norm))
        self._epochs[step] = epoch
        if self.sampler is not None:
            self._positions[step] = self.sampler.position
            self._positions.pop(step - 4 * (self.policy.skip_after + self.policy.margin + 8), None)
        results: list[VoteResult | None] = list(self._deferred)
        self._deferred.clear()
        self._steps_since_digest += 1
        self._steps_since_timing += 1
        if step % self.vote_every == 0 or save:
            preempt = self._preempt or preemption.requested() is not None
            checks = {**(self._replica_checks(step) or {}), **(self._timing_checks() or {})}
            results.append(self._receive(self.vote.submit(step, values=self._values, preempt=preempt,
                                                          checks=checks, **self._flags)))
            self._values = []
            self._flags = {"spike": False, "nonfinite": False, "stop": False}
            self._preempt = False
        if save:
            results.append(self._receive(self.vote.flush()))
        for result in results:
            if result is not None:
                outcome = self._act(result, now=step)
                if outcome is not CONTINUE:
                    return outcome
        if save:
            try:
                self.save(step, metadata=metadata, blocking=blocking)
            except ReplicaDivergenceError as e:  # this save's agreement (or the one in flight) found it
                return self._recover_replicas(e.step, e.disagreement, now=step)
        return CONTINUE

    # -- silent replica divergence ----------------------------------------------------------------
    def _replica_checks(self, step: int) -> dict[Any, Any] | None:
        """The rotating digest this check carries, every ``replica_check_every`` steps (the same
        steps on every rank: each rank counts the same calls)."""
        every = self.options.replica_check_every
        if not every or self.vote.world_size < 2 or self._steps_since_digest < every:
            return None
        self._steps_since_digest = 0
        if self._rotation is None:
            self._rotation = replicas.Rotation(replicas.replicated_parameters(self.replica_state),
                                               self.options.replica_slices)
        if not self._rotation.parameters:
            return None  # nothing replicated (every module PerRank or sharded)
        sample = self._samples[step] = self._rotation.next()
        return {REPLICA_DIGEST_MIN: sample.value, REPLICA_DIGEST_MAX: sample.value}

    # -- stragglers ---------------------------------------------------------------------------------
    def _timing_checks(self) -> dict[Any, Any] | None:
        """This rank's mean busy time per step since the last timing check, every
        ``straggler_check_every`` steps (the same steps on every rank)."""
        every = self.options.straggler_check_every
        if not every or self.vote.world_size < 2 or self._steps_since_timing < every:
            return None
        self._steps_since_timing = 0
        mean = statistics.fmean(self._busy) if self._busy else 0.0
        self._busy = []
        return {STEP_BUSY_MAX: pack(mean, self.checkpoints.rank), STEP_BUSY_SUM: mean}

    def _judge_timing(self, result: VoteResult) -> None:
        if STEP_BUSY_MAX.name not in result.checks:
            return
        found = self._stragglers.observe(result.step, result.checks[STEP_BUSY_MAX.name],
                                         result.checks[STEP_BUSY_SUM.name], result.world_size)
        if found is None:
            return
        why_not = self._cannot_spare_a_node() if self.options.exclude_stragglers else "exclusion is off"
        if self.checkpoints.rank == found.rank:  # it knows its own host; every rank knows the rest
            self.emit(Event.STRAGGLER_DETECTED, step=found.step, straggler=found.rank, host=socket.gethostname(),
                      ratio=found.ratio, busy_s=found.busy_s, others_s=found.others_s, checks=found.checks,
                      excluded=why_not is None,
                      reason=f"rank {found.rank} spent {found.busy_s:g} s per step at work against the other ranks' "
                             f"{found.others_s:g} s ({found.ratio:g}x, {found.checks} checks in a row): every rank "
                             f"waits for it at each gradient synchronization"
                             + ("; its node leaves the job" if why_not is None else f"; {why_not}"))
        if why_not is None:
            self._slow[result.step] = found

    def _exclude(self, found: Straggler, now: int) -> NoReturn:
        """Every rank alike: save this step, then the straggler's node leaves and the rest re-form
        without it from this step."""
        self.vote.discard()
        self.save(now)
        self._leave_job(found.rank, f"rank {found.rank} is a persistent straggler ({found.ratio:g}x the other "
                                    f"ranks' busy time)", now)

    @staticmethod
    def _cannot_spare_a_node() -> str | None:
        """Why no node can leave the job now (None: one can). The launcher passes the fewest
        nodes the job may go on with; torchrun gives the node count and ranks per node."""
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1)
        least = int(os.environ.get(Env.MIN_NODES, str(nodes)) or nodes)
        if not os.environ.get("LOCAL_WORLD_SIZE") or nodes - 1 < least:
            return (f"its node cannot leave: {nodes} node(s) and the job needs at least {least} (launch with "
                    "--nnodes MIN:MAX to leave room)")
        return None

    def _leave_job(self, rank: int, why: str, now: int) -> NoReturn:
        """Every rank alike, after every rank holds a committed step to resume from: ``rank``'s
        node asks its launcher to leave (it exits 0 and is not restarted), and every rank exits
        through RegroupError so the other launchers re-form the job without that node."""
        per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1)
        if self.checkpoints.rank // per_node == rank // per_node:
            heartbeat.leave()
        raise RegroupError(f"{why}: its node (node {rank // per_node}) leaves the job and the other {nodes - 1} go on "
                           f"without it from step {now}")

    # -- silent replica divergence, before a save --------------------------------------------------
    def check_replicas(self, step: int) -> None:
        """Collective, on every rank, right before a checkpoint that one rank writes alone (as
        Lightning's): compare every replicated parameter's digest, so a checkpoint of replicas
        that differ is never committed. Raises ReplicaDivergenceError (every rank alike): the
        launcher restarts from the newest checkpoint, which agreed when it was taken."""
        if not self.options.replica_check_every or self.vote.world_size < 2:
            return
        mine = replicas.state_digests(self.replica_state)
        if not mine.names:
            return
        rows = [t.tolist() for t in self.vote.gather(torch.tensor(mine.values, dtype=torch.int64))]
        found = replicas.disagreement(rows, mine.names)
        if found is None:
            return
        self.emit(Event.REPLICA_DIVERGENCE, **found.event_fields(step, self.vote.world_size, "save"))
        raise ReplicaDivergenceError(found.refusal(step, self.vote.world_size), step=step, disagreement=found)

    def _name_divergence(self, result: VoteResult) -> None:
        """Collective, on every rank alike (they all read the same MIN != MAX): gather the
        sample's per-parameter digests to name the odd ranks and the parameters."""
        sample = self._samples.pop(result.step, None)
        assert sample is not None and self._rotation is not None
        rows = [t.tolist() for t in self.vote.gather(sample.per_tensor)]
        found = replicas.disagreement(rows, self._rotation.names(sample.indices))
        if found is None:  # the parameters agree now but did not then: the combined digests said so
            found = replicas.Disagreement(list(range(result.world_size)), [], 0)
        self._diverged[result.step] = found
        self.emit(Event.REPLICA_DIVERGENCE, **found.event_fields(result.step, result.world_size, "vote"))

    def _recover_replicas(self, onset: int, found: replicas.Disagreement, now: int) -> StepOutcome:
        """Replicas that differ: roll back to the newest committed checkpoint. Every committed
        one agreed when it was saved (a save whose ranks disagree is refused), and the steps
        after it are trained again as they were: same data, same LR."""
        self.vote.discard()
        self._samples.clear()
        self._diverged.clear()
        try:
            self.checkpoints.wait()
        except ReplicaDivergenceError:
            pass  # the save in flight holds the diverged replicas: refused, as it must be
        committed = [s for s, _, _ in self.checkpoints.checkpoint_health() if s <= now]
        reason = f"replicas differ after step {onset} ({found.describe(self.vote.world_size)})"
        if not committed:
            raise ReplicaDivergenceError(f"{reason}, and no checkpoint is committed to roll back to: the launcher "
                                         "restarts the job from the start", step=onset, disagreement=found)
        if self.options.exclude_diverged and len(found.ranks) == 1 and self._cannot_spare_a_node() is None:
            self._leave_job(found.ranks[0], f"rank {found.ranks[0]}'s replica differs from the others' ({reason})",
                            max(committed))
        if self.recovery.rollbacks >= self.policy.budget:
            reason = (f"{reason}, but the rollback budget of {self.policy.budget} is spent; a node whose replica keeps "
                      "diverging has a fault no rollback cures")
            self.emit(Event.GAVE_UP, step=onset, reason=reason, rollbacks=self.recovery.rollbacks,
                      budget=self.policy.budget)
            raise GaveUpError(reason)
        decision = RollbackDecision(onset=onset, anchor=max(committed), skip_through_step=None, skip_end=None,
                                    reason=reason, at_step=now, recovery=self.recovery.state_dict(),
                                    cause="replica_divergence")
        self.checkpoints.record_decision(decision.to_json())
        return self._carry_out(decision)

    def _local(self, detector: Detector) -> bool:
        return judged_where(detector, self.judge) == Judge.RANK

    def _global(self, detector: Detector) -> bool:
        return judged_where(detector, self.judge) == Judge.GLOBAL

    def _receive(self, result: VoteResult | None) -> VoteResult | None:
        """A vote result has come in: judge its global losses (the same numbers, hence the same
        verdict, on every rank) and mark trouble for the health of the next checkpoint."""
        if result is None:
            return None
        if result.replicas_disagree:
            self._name_divergence(result)
        else:
            self._samples.pop(result.step, None)
        self._judge_timing(result)
        found = None
        for values in result.values:
            epoch = self._epochs.pop(values.step, None)
            if values.nonfinite:
                continue  # the mean of the finite ranks is no loss to learn a baseline from
            self._global_losses.append(values.loss)
            if self.checkpoints.rank == 0:  # the curve the report plots: what the detectors saw
                self.checkpoints.events.record(Event.LOSS_JUDGED, step=values.step, loss=values.loss,
                                               ranks=result.world_size)
            verdict, name = self.bank.update(values.step, values.loss, values.grad_norm, where=self._global, epoch=epoch)
            if verdict and found is None:
                found = verdict
                self.emit(Event.SPIKE_DETECTED, step=values.step, detector=name, reason=verdict.reason, loss=values.loss,
                          judged="global", plateau=verdict.plateau)
        if found is not None:
            result = replace(result, verdict=found, stop=result.stop + int(found.stop))
        if result.trouble:
            self._last_trouble = max(self._last_trouble or 0, result.step)
        return result

    def _record_step(self, step: int, loss: float, grad_norm: float | None) -> None:
        """One line per step in the event file (rank 0): the loss curve and the step times that
        ``elastic-resume report`` turns into a plot and a goodput figure."""
        now = time.monotonic()
        seconds = None if self._step_clock is None else now - self._step_clock
        self._step_clock = now
        if self.options.straggler_check_every and self.vote.world_size > 1:
            if self._busy_clock is None:
                self._busy_clock = BusyClock(self.state, self.replica_state)
            elif seconds is not None:
                self._busy.append(self._busy_clock.busy(seconds))
        if self.checkpoints.rank == 0:
            self.checkpoints.events.record(Event.STEP, step=step, loss=loss,
                                           seconds=None if seconds is None else round(seconds, 6),
                                           **({} if grad_norm is None else {"grad_norm": grad_norm}))

    def _act(self, result: VoteResult, now: int) -> StepOutcome:
        diverged = self._diverged.pop(result.step, None)
        if diverged is not None:
            return self._recover_replicas(result.step, diverged, now)
        slow = self._slow.pop(result.step, None)
        if slow is not None:
            self._exclude(slow, now)
        action = decide(self.policy, result, None, self.recovery)
        if action.kind == ActionKind.NEEDS_CHECKPOINTS:
            action = decide(self.policy, result, self.checkpoints.checkpoint_health(), self.recovery)
        if result.spike or result.stop:
            self.emit(Event.VOTE_TRIGGERED, step=result.step, spikes=result.spikes, nonfinite=result.nonfinite,
                      ranks=result.world_size, quorum=result.quorum, mean_loss=result.mean_loss, action=action.kind,
                      judged=self.judge, plateau=result.plateau_only)
        if action.kind == ActionKind.CONTINUE:
            if action.reason:
                self.emit(Event.SPIKE_IGNORED, step=result.step, reason=action.reason)
            return CONTINUE
        if action.kind == ActionKind.SAVE:
            self.vote.discard()
            self.save(now)
            self.emit(Event.PREEMPTION_SAVE, step=now, signal=(preemption.requested() or {}).get("signal"))
            preemption.clear()
            return StepOutcome(Outcome.PREEMPTED, now)
        if action.kind == ActionKind.STOP:
            self.vote.discard()
            self.checkpoints.wait()
            reason = f"{action.reason}; {self._what_the_run_looked_like(result)}"
            self.emit(Event.GAVE_UP, step=result.step, reason=reason, rollbacks=self.recovery.rollbacks,
                      budget=self.policy.budget)
            raise GaveUpError(reason)
        return self._rollback(action, now)

    def _what_the_run_looked_like(self, result: VoteResult) -> str:
        """The evidence behind giving up, for the person who reads why: each rollback so far and
        the loss the guard judged, recently and at this step."""
        rollbacks = "; ".join(f"step {h['onset']} -> {h['anchor']} ({h['reason']})" for h in self.recovery.history[-5:])
        said = f"rollbacks so far: {rollbacks}" if rollbacks else "no rollback so far"
        recent = list(self._global_losses)
        if recent:
            said += (f"; the loss over the last {len(recent)} steps judged: median {statistics.median(recent):.6g},"
                     f" lowest {min(recent):.6g}, highest {max(recent):.6g}")
        if not math.isnan(result.mean_loss):
            said += f"; at step {result.step}: {result.mean_loss:.6g} (the mean over {result.world_size} ranks)"
        return said

    # -- rollback -----------------------------------------------------------------------------
    def _skip_end(self, action: Action, now: int) -> int | None:
        """Absolute sample position where data resumes: the position after step
        ``skip_through_step``, extrapolated from the positions seen around the onset."""
        if self.sampler is None or not self._positions or action.skip_through_step is None:
            return None
        onset = action.onset or now
        known = sorted(s for s in self._positions if s <= max(onset, min(self._positions)))
        at = known[-1] if known else min(self._positions)
        pos = self._positions[at]
        prev = self._positions.get(at - 1)
        newest = max(self._positions)
        per_step = (pos - prev) if prev is not None else (self._positions[newest] - pos) / max(1, newest - at)
        return int(pos + max(0, action.skip_through_step - at) * per_step)

    def _rollback(self, action: Action, now: int) -> StepOutcome:
        assert action.anchor is not None and action.onset is not None
        self.vote.discard()
        # The decision goes to storage before anything is acted on: a crash anywhere between
        # here and the re-commit of the anchor (which carries the rollback's effects) finds it
        # at the next start, and the same rollback is carried out then (attach).
        decision = RollbackDecision(onset=action.onset, anchor=action.anchor, skip_through_step=action.skip_through_step,
                                    skip_end=self._skip_end(action, now), reason=action.reason, at_step=now,
                                    recovery=self.recovery.state_dict())
        self.checkpoints.record_decision(decision.to_json())
        return self._carry_out(decision)

    def _carry_out(self, decision: RollbackDecision) -> StepOutcome:
        with heartbeat.section(heartbeat.Section.ROLLBACK):
            return self._carry_out_now(decision)

    def _carry_out_now(self, decision: RollbackDecision) -> StepOutcome:
        action = Action(ActionKind.ROLLBACK, onset=decision.onset, anchor=decision.anchor,
                        skip_through_step=decision.skip_through_step, reason=decision.reason)
        assert action.anchor is not None and action.onset is not None
        now, skip_end = decision.at_step, decision.skip_end
        before = Recovery()
        before.load_state_dict(decision.recovery)
        self._end_replay()  # what comes after the anchor is trained on other data, with other settings
        self.emit(Event.ROLLBACK_STARTED, from_step=action.onset, to_step=action.anchor, reason=action.reason)
        # Load the anchor before retiring anything: only a step every rank just loaded may make
        # the newer ones (the abandoned timeline) go, so a rollback never leaves less than it found.
        self.checkpoints.restore(self.state, step=action.anchor)
        # The anchor's detectors had not seen what came after it; clocks that are recovery
        # state (a plateau's after_steps) restart from the anchor instead of replaying.
        self.bank.on_rollback(action.anchor)
        self._values, self._epochs = [], {}
        self._samples.clear()
        self._steps_since_digest = self._steps_since_timing = 0
        self._busy = []
        self._global_losses.clear()
        # The anchor is re-committed below with the recovery state: replace what was restored.
        self.checkpoints.allow_replace(action.anchor)
        self.checkpoints.retire_newer_than(action.anchor, reason=f"rollback from a spike at step {action.onset}")
        self._committed = [c for c in self._committed if c[0] <= action.anchor]
        anchor_lr_scale = self.recovery.lr_scale  # what the anchor's optimizer already carries
        start = self.sampler.position if self.sampler is not None else None
        after = before
        after.rollbacks += 1
        if decision.cause == "spike":  # replicas that diverged are trained again as they were
            after.lr_scale *= self.policy.lr_scale
            after.clip_scale *= self.policy.clip_scale
            after.cooldown_left = self.policy.cooldown
        window = [start, skip_end] if start is not None and skip_end is not None and skip_end > start else None
        if window:
            after.windows.append(window)
        after.history.append({"onset": action.onset, "anchor": action.anchor, "skipped": window,
                              "lr_scale": after.lr_scale, "reason": action.reason})
        self.recovery.load_state_dict(after.state_dict())
        scale_learning_rate(self.state, after.lr_scale / anchor_lr_scale)
        if window and self.sampler is not None:
            self.sampler.seek(window[1])
            self.emit(Event.DATA_SKIPPED, start_sample=window[0], end_sample=window[1], samples=window[1] - window[0],
                      through_step=action.skip_through_step)
        self.emit(Event.ROLLBACK_RESTORED, step=action.anchor, tier=self.checkpoints.last_restore_tier)
        self._last_trouble = None
        self._positions.clear()
        # Re-commit the anchor with the recovery state and the new data position, in the
        # background: training goes on at once. A crash before that commit lands is healed by
        # the decision recorded above: the next start carries out this same rollback.
        self.save(action.anchor, blocking=False)
        self.emit(Event.ROLLBACK, from_step=action.onset, to_step=action.anchor, skipped=window,
                  lr_scale=after.lr_scale, rollbacks=after.rollbacks, budget=self.policy.budget,
                  steps_lost=now - action.anchor, cause=decision.cause)
        self._step_clock = time.monotonic()
        return StepOutcome(Outcome.ROLLBACK, action.anchor)
