"""``CheckpointManager``: rank-coordinated save and agreed restore of a training state at one root.

A facade over the checkpoint engine, configured by :class:`CheckpointOptions`:

- save: ``saving.StepWriter`` (the foreground snapshot and staging, the collective write, the
  commit); then ``retention`` on rank 0;
- restore: rank 0 lists the candidates (minus crash-looping steps, ``crash_loop``), every rank
  reads its share (``reading``), ``agreement.agree`` picks the newest step every rank read on
  the same commit, the drift report runs (``drift``) and the state is loaded in place;
- for the spike guard (``spike.backend.CheckpointBackend``): the health of the committed steps,
  retiring the steps of an abandoned timeline, protecting rollback anchors from retention,
  replacing the anchor it re-commits, allowing the drift its own LR scaling causes.

In a ``torch.distributed`` job every rank constructs the manager and calls ``save`` and
``restore`` together. Coordination runs on a gloo group of its own with ``collective_timeout_s``,
so a dead rank turns into an error, never a hang.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Collection, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import heartbeat, membership, preemption
from ..collectives import Group, InGroup, on_rank0, process_group
from ..contract import DEFAULT_MAX_RESUMES_PER_STEP, Env, Event
from ..errors import BadRootError, CheckpointCorruptError, ConfigError, StateError, StorageError
from ..events import EventLog
from ..progress import RESTORE_BAR_BYTES, ProgressBar, on_terminal
from ..storage import LocalStorage, open_storage
from . import drift, fingerprint
from .agreement import Agreed, Candidate, agree
from .layout import ROLLBACK_DECISION
from .manifest import FileEntry, Manifest
from .memory_tier import DEFAULT_MEMORY_KEEP, MemoryTier
from .reading import LoadedStep, ReadAttempt, try_read
from .root_records import read_record_together, write_record_together
from .saving import StepWriter
from .state import apply_state, stale_step_counters
from .store import CheckpointStore
from .values import allowed_class_names

log = logging.getLogger("elastic_resume")


def max_resumes_from_env() -> int:
    """The crash-loop limit the launcher passes down (``--er-max-resumes-per-step``)."""
    raw = os.environ.get(Env.MAX_RESUMES_PER_STEP, str(DEFAULT_MAX_RESUMES_PER_STEP))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{Env.MAX_RESUMES_PER_STEP}={raw!r} is not an integer") from None
    if value < 0:
        raise ConfigError(f"{Env.MAX_RESUMES_PER_STEP}={raw!r} must be 0 (off) or more")
    return value


def open_events(event_log: EventLog | str | os.PathLike[str] | None, rank: int) -> EventLog:
    """An ``event_log`` option as an EventLog: given, a path, or the launcher's (``ER_EVENT_LOG``)."""
    if isinstance(event_log, EventLog):
        return event_log
    if event_log is not None:
        return EventLog(event_log, rank=rank)
    return EventLog.from_env(rank=rank)


class RestoreBar:
    """Rank 0's progress bar over the bytes a restore reads and receives, on a terminal and for
    a step of at least ``RESTORE_BAR_BYTES`` only (one bar per step tried)."""

    def __init__(self, rank: int) -> None:
        self.enabled = rank == 0 and on_terminal()
        self.step: int | None = None
        self.bar: ProgressBar | None = None
        self.done = 0

    def loaded(self, manifest: Manifest, entry: FileEntry) -> None:
        if not self.enabled or manifest.total_bytes < RESTORE_BAR_BYTES:
            return
        if manifest.step != self.step:
            self.close()
            self.step, self.done = manifest.step, 0
            self.bar = ProgressBar(f"restoring step {manifest.step}")
        self.done += entry.size
        assert self.bar is not None
        self.bar(self.done, manifest.total_bytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass(kw_only=True)
class CheckpointOptions:
    """How a :class:`CheckpointManager` saves, keeps and restores checkpoints."""

    keep_last: int | None = 3
    """Keep this many newest loadable steps (a corrupt step never counts); None keeps every step.
    The newest loadable step and rollback anchors are kept whatever this says."""
    keep_every: int | None = None
    """Also keep every step divisible by this, forever (milestones)."""
    storage_options: Mapping[str, Any] | None = None
    """Options for the storage backend (fsspec: ``endpoint_url``, credentials, ...). The usual
    environment (``AWS_*``, profiles) applies otherwise; values are never logged."""
    event_log: EventLog | str | os.PathLike[str] | None = None
    """Where events go: an ``EventLog``, a JSONL path, or None for the launcher's
    (``ER_EVENT_LOG``) or none at all."""
    read_only: bool = False
    """Restore and inspect only: no root is created, no resume is counted, ``save`` is refused."""
    collective_timeout_s: float = 600.0
    """How long a rank waits for the others in a checkpoint collective before failing."""
    config: Mapping[str, Any] | None = None
    """Your resolved training config; part of the drift fingerprint (a resume reports what changed)."""
    data_description: Any = None
    """A description of the data pipeline (a dict or a string); part of the drift fingerprint."""
    drift: str = "warn"
    """What a difference between the saved and the current run does: ``warn``, ``fail``
    (``DriftError``, nothing restored) or ``ignore``."""
    drift_allow: Sequence[str] = ()
    """Fingerprint names never reported as drift (fnmatch globs, e.g. ``versions.*``)."""
    allowed_classes: Sequence[str | type] = ()
    """Your own classes (or their ``"module:QualName"`` names) whose enum members and dataclass
    instances a restore rebuilds; any other class comes back in plain form (the enum's value,
    the dataclass's fields as a dict). Nothing in a checkpoint chooses code to run."""
    parallel_restore: bool | str = "auto"
    """At more than one rank, each rank reads a disjoint share of the replicated files and the
    ranks exchange the rest over the coordination group: O(N) requests per restore on an object
    store, not N x N. ``"auto"``: on object stores (on a local disk re-reading from the page
    cache is faster than the exchange; set True for a network file system). False: every rank
    reads every replicated file itself."""
    memory_keep: int = DEFAULT_MEMORY_KEEP
    """Newest committed steps whose files each rank keeps in host RAM (the memory tier): a
    rollback or restore to one of them reads no storage, every byte still checked against the
    committed manifest. Costs about ``memory_keep + 1`` times this rank's share of a save
    (1/N of the replicated state at N ranks, plus its per-rank state); 0 turns it off."""
    max_resumes_per_step: int | None = None
    """Resumes from one step, with nothing newer committed, before restore falls back to the step
    before (a crash loop); 0 disables; None: what the launcher passes (``--er-max-resumes-per-step``), else 3."""

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None (got {value!r})")
        if self.parallel_restore not in (True, False, "auto"):
            raise ConfigError(f"parallel_restore must be True, False or 'auto' (got {self.parallel_restore!r})")
        mk = self.memory_keep
        if not isinstance(mk, int) or isinstance(mk, bool) or mk < 0:
            raise ConfigError(f"memory_keep must be 0 (off) or a positive integer (got {mk!r})")
        mr = self.max_resumes_per_step
        if mr is not None and (not isinstance(mr, int) or isinstance(mr, bool) or mr < 0):
            raise ConfigError(f"max_resumes_per_step must be 0 (off), a positive integer or None (got {mr!r})")
        drift.check_policy(self.drift, "CheckpointManager")
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"collective_timeout_s must be positive (got {self.collective_timeout_s!r})")
        allowed_class_names(self.allowed_classes)  # a bad entry fails here, naming it
        if isinstance(self.drift_allow, str):
            raise ConfigError(f"drift_allow must be a list of patterns, not the string {self.drift_allow!r}")


class CheckpointManager(InGroup):
    """Save and restore a training state at a checkpoint root (a local path, ``file://``,
    ``s3://``, ``gs://``, ``az://`` or ``memory://``).

    ``state`` is a dict whose values are objects with ``state_dict()``/``load_state_dict()``
    (modules, optimizers, schedulers, samplers; restored in place) or plain values (tensors,
    numbers, strings, containers of those; replaced in the dict on restore). Values are
    replicated unless marked per-rank (``RNGState``, ``PerRank``).

    Configure it with :class:`CheckpointOptions` or the same names as keyword arguments:
    ``CheckpointManager(root, keep_last=5)`` is ``CheckpointManager(root, CheckpointOptions(keep_last=5))``.
    ``group`` is where ranks agree (default: a gloo group over every rank of the default process
    group; ``LocalGroup()`` for a world of one).
    """

    def __init__(self, root: str | os.PathLike[str], options: CheckpointOptions | None = None, *,
                 group: Group | None = None, **settings: Any) -> None:
        if options is not None and settings:
            raise ConfigError(f"CheckpointManager: pass CheckpointOptions or keyword settings, not both "
                              f"(got options and {', '.join(sorted(settings))})")
        self.options = options if options is not None else CheckpointOptions(**settings)
        opts = self.options
        #: Where ranks agree: a live handle (rank and world size are read through it on every
        #: call, so a re-formed job, ``membership.current().reconfigure()``, needs nothing here).
        self.group = group if group is not None else membership.current().coordination_group(opts.collective_timeout_s)
        self.events = open_events(opts.event_log, self.rank)
        membership.current().follow(self._follow_rank)
        self.root = os.fspath(root)
        self.storage = open_storage(self.root, dict(opts.storage_options or {}))
        self.store = CheckpointStore(self.storage, events=self.events,
                                     allowed_classes=allowed_class_names(opts.allowed_classes))
        self.max_resumes_per_step = max_resumes_from_env() if opts.max_resumes_per_step is None else opts.max_resumes_per_step
        self.last_committed: int | None = None
        self.last_restored: int | None = None
        self.last_drift: list[str] = []  # the drift report's lines of the last restore
        #: The memory tier: this rank's files of the newest committed steps (see memory_tier.py).
        self.memory = MemoryTier(0 if opts.read_only else opts.memory_keep)
        #: Where the last restore's bytes came from: ``memory`` or ``storage``.
        self.last_restore_tier: str | None = None
        self._writer = StepWriter(self.group, self.events, self.memory)
        # Rollback anchors retention must keep (the spike guard says which, see protect()).
        self._protected: frozenset[int] = frozenset()
        # Drift the guard's own recovery causes (a scaled LR), not a difference between runs.
        self._recovery_drift: list[str] = []
        # Committed steps this incarnation proved it must not use (skipped as unloadable by
        # restore, dropped by the crash-loop fallback, a rollback anchor to re-commit), each
        # with the digest of the manifest it judged: a new save of such a step replaces exactly
        # that manifest, and nothing someone else committed there since (rank 0 only).
        self._replaceable: dict[int, str] = {}
        # Raw digest of every manifest this process read while restoring, by step.
        self._seen_manifests: dict[int, str] = {}
        # Committed steps newer than a step restored explicitly (``restore(step=N)``): the
        # timeline this run branched away from, each with the manifest digest seen (rank 0).
        self._abandoned: dict[int, str] = {}
        # save_if_preempted: the flag sum started at the last call, read at the next one.
        self._preemption_flag: tuple[Any, Any] | None = None
        self._preemption_registered = False
        self._warned_preemption = False
        # Rank 0 creates the root and proves it can write before any training happens, so a
        # bad root fails in the first second rather than at the first save an hour in. A writer
        # is constructed on every rank (saving is collective): each one raises the same error,
        # the permanent kind included, instead of the others failing on rank 0's exit.
        if opts.read_only:
            if self.rank == 0:
                self.storage.ensure_root(create=False, probe_write=False)
        else:
            bad_root = on_rank0(self.group, self._ensure_root, error=StorageError, what="checkpoint root")
            if bad_root is not None:
                raise BadRootError(errno.ENOTDIR, bad_root)

    def _follow_rank(self) -> None:
        """After a re-formation this process may hold another rank: its events say so."""
        self.events.rank = self.rank

    def _ensure_root(self) -> str | None:
        """Rank 0: create the root and probe a write. A root that can never be one comes back as
        its message (every rank raises it); anything else raises (every rank hears it)."""
        try:
            self.storage.ensure_root(create=True, probe_write=True)
        except BadRootError as e:
            return str(e)
        return None

    # -- save ---------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
        blocking: bool = True,
        health: Mapping[str, Any] | None = None,
    ) -> Manifest | None:
        """Write ``state`` as checkpoint ``step`` on every rank and commit it.

        Blocking (default): returns the committed manifest; raises on every rank if any rank
        failed, and then nothing is committed. ``blocking=False``: returns once this rank's share
        of the state is copied into reusable buffers, without waiting for any other rank; writing
        and the commit continue in the background, and the next ``save``/``restore``/``wait()``
        (or interpreter exit) waits for it and raises its error if it failed."""
        if self.options.read_only:
            raise ConfigError(f"checkpoint manager for {self.root} was opened read_only; save() is not allowed")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"step must be a non-negative integer (got {step!r})")

        self._warn_if_preemption_is_ignored()

        def current_fingerprint() -> dict[str, Any]:
            return fingerprint.compute(state, world_size=self.world_size, config=self.options.config,
                                       data_description=self.options.data_description)

        with heartbeat.section(heartbeat.Section.SAVE):  # no hang however long: the launcher waits longer
            return self._writer.save(self.store, step, state, metadata=metadata, health=health,
                                     fingerprint=current_fingerprint, blocking=blocking,
                                     replace=self._replaceable.get(step) if self.rank == 0 else None,
                                     after_commit=self._after_commit)

    def save_if_preempted(self, step: int, state: Mapping[str, Any], *,
                          metadata: Mapping[str, Any] | None = None) -> bool:
        """Collective, once per step at the step boundary: honour a preemption (SIGUSR1/SIGTERM
        that the launcher forwards, Slurm's time-limit warning, a Kubernetes eviction). When any
        rank got the signal, every rank saves this same ``step`` (blocking) and it returns True:
        leave the loop and exit with ``EXIT_PREEMPTED`` (75), and the launcher requeues.

        The ranks agree through one 8-byte ``all_reduce`` started here and read at the next
        call, so no step waits on it; a signal therefore leads to a save one step later."""
        heartbeat.beat(step)
        if not self._preemption_registered:
            preemption.register_consumer()  # from now on SIGTERM is a request, not a death
            self._preemption_registered = True
        if self._agreed_preemption():
            # Every rank read the same sum: all save this step now; no new check is started.
            self._preemption_flag = None
            self.save(step, state, metadata=metadata)
            self.events.emit(Event.PREEMPTION_SAVE, step=step, signal=(preemption.requested() or {}).get("signal"))
            preemption.clear()
            return True
        import torch

        flag = torch.tensor([1.0 if preemption.requested() is not None else 0.0], dtype=torch.float64)
        work = None
        if process_group(self.group) is not None and self.world_size > 1:
            import torch.distributed as dist

            # A group of its own (made at the first call, which every rank makes at the same
            # step): a background save runs collectives on the manager's group from its thread,
            # and two threads' collectives on one group would interleave differently on
            # different ranks.
            group = membership.current().named_group("preemption")
            work = dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=group, async_op=True)
        self._preemption_flag = (flag, work)
        return False

    def _agreed_preemption(self) -> bool:
        """Whether any rank had the flag at the previous call (every rank reads the same sum)."""
        if self._preemption_flag is None:
            return False
        flag, work = self._preemption_flag
        if work is not None:
            work.wait()
        return float(flag.item()) > 0

    def _warn_if_preemption_is_ignored(self) -> None:
        """Under the launcher, a script that saves but never looks at the preemption flag ignores
        the scheduler's warning until the grace runs out; say so once, at its first save."""
        if self._warned_preemption or not os.environ.get(Env.LAUNCHER_PID) or preemption.has_consumer():
            return
        self._warned_preemption = True
        reason = ("this script saves checkpoints but never checks for preemption: a SIGUSR1/SIGTERM from the "
                  "scheduler is ignored until the launcher's grace runs out, and the job resumes from the last "
                  "periodic save. Call mgr.save_if_preempted(step, state) once per step (exit 75 when it returns "
                  "True), or use SpikeGuard / ElasticResume")
        if self.rank == 0:
            log.warning("%s", reason)
        self.events.emit(Event.PREEMPTION_IGNORED, reason=reason)

    def _after_commit(self, manifest: Manifest) -> None:
        self.last_committed = manifest.step
        self._replaceable.pop(manifest.step, None)
        if self.rank != 0:
            return
        try:
            self._retire_abandoned(manifest)
            if self.options.keep_last is not None or self.options.keep_every is not None:
                # The step just committed is never retention's to delete.
                self.store.prune(keep_last=self.options.keep_last, keep_every=self.options.keep_every,
                                 protect=self._protected | {manifest.step})
        except Exception as e:  # noqa: BLE001 - clean-up failure must not fail training
            self.events.emit(Event.PRUNE_FAILED, step=manifest.step, error=str(e))

    def _retire_abandoned(self, manifest: Manifest) -> None:
        """The first commit after ``restore(step=N)`` makes this run's timeline the one a resume
        follows: the steps newer than N that stood when it restored are retired (each only while
        it holds the manifest seen then; a step this run saved again was replaced already).
        Until that commit they stay, so the root is never left without them and without a
        successor; after it, "newest" is again the step this run wrote last."""
        if not self._abandoned:
            return
        if (why := self.store.why_not_standing(manifest)) is not None:
            self.events.emit(Event.PRUNE_FAILED, step=manifest.step,
                             error=f"abandoned steps kept: the step just committed does not verify ({why})")
            return
        abandoned, self._abandoned = self._abandoned, {}
        branch = self.last_restored
        for step, digest in sorted(abandoned.items()):
            if step != manifest.step and self.store.manifest_digest(step) == digest:
                self.store.retire(step)
                self.events.emit(Event.CHECKPOINT_RETIRED, step=step, reason=(
                    f"abandoned timeline: this run restored step {branch} and committed step {manifest.step}"))

    def wait(self) -> Manifest | None:
        """Wait for a background save; raise its error if it failed."""
        return self._writer.wait()

    @property
    def save_in_progress(self) -> bool:
        return self._writer.save_in_progress

    @property
    def staging_bytes(self) -> int:
        """Host memory this rank holds for background saves: its share of the replicated state
        plus its own per-rank state and shards (about 1/N of the replicated bytes at N ranks)."""
        return self._writer.stager.nbytes

    def close(self) -> None:
        self._writer.close()
        heartbeat.finished()  # what the script does after training is not watched for hangs

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- restore ------------------------------------------------------------------------------
    def restore(self, state: MutableMapping[str, Any], *, step: int | None = None) -> int | None:
        """Restore ``state`` in place from the newest step every rank can verify and load (or
        exactly ``step``). Returns the step, or None when no checkpoint was ever committed.
        Corrupt steps are reported and skipped; if committed steps exist but none loads, raises
        NoCheckpointError rather than silently starting over."""
        with heartbeat.section(heartbeat.Section.RESTORE):
            return self._restore(state, step)

    def _restore(self, state: MutableMapping[str, Any], step: int | None) -> int | None:
        self.wait()
        started = time.perf_counter()
        current = fingerprint.compute(state, world_size=self.world_size, config=self.options.config,
                                      data_description=self.options.data_description)
        steps = on_rank0(self.group, lambda: self._candidates() if step is None else [step],
                         error=lambda m: StorageError(0, m), what=f"cannot list checkpoints under {self.storage.display()}")
        if not steps:
            self.events.emit(Event.RESTORE_NONE, root=self.storage.display(), reason="no committed checkpoint")
            return None
        bar = RestoreBar(self.rank)
        self.store.on_loaded = bar.loaded
        try:
            agreed = self._agree(steps, state)
        finally:
            self.store.on_loaded = None
            bar.close()
        loaded = agreed.value
        manifest = loaded.manifest
        self.last_drift = drift.check(manifest.fingerprint, current, step=manifest.step, policy=self.options.drift,
                                      allow=[*self.options.drift_allow, *self._recovery_drift], events=self.events,
                                      restored_tree=loaded.replicated)
        self._apply(state, loaded)
        for name, value in stale_step_counters(state, manifest.step):
            reason = (f"restored step {manifest.step}, but {name} is {value}: the script's counter was not current when "
                      f"step {manifest.step} was saved (a preemption saves at any step); a loop that continues from "
                      f"{value} trains steps again on the newer model. Update it at every step, or continue from "
                      f"the step restore() returns")
            log.warning("%s", reason)
            self.events.emit(Event.STEP_COUNTER_STALE, step=manifest.step, counter=name, value=value, reason=reason)
        if manifest.world_size == self.world_size:  # then every file was read by some rank
            self.store.mark_loadable(manifest.step, manifest.raw_digest)
        self.last_committed = self.last_restored = manifest.step
        self.last_restore_tier = loaded.tier
        if step is not None and self.rank == 0 and not self.options.read_only:
            self._branch_from(manifest.step)
        self.events.emit(
            Event.RESTORED, step=manifest.step, bytes=manifest.total_bytes,
            seconds=round(time.perf_counter() - started, 4), skipped=[s.as_dict() for s in agreed.skipped],
            saved_world_size=manifest.world_size, world_size=self.world_size, tier=loaded.tier,
        )
        return manifest.step

    def _branch_from(self, step: int) -> None:
        """Rank 0, after ``restore(step=...)``: the committed steps newer than ``step`` lie on the
        timeline this run leaves. A save of one of them replaces it (not a conflict), and the
        first commit retires the rest (see :meth:`_retire_abandoned`)."""
        newer = {s: d for s in self.store.committed_steps() if s > step
                 if (d := self.store.manifest_digest(s)) is not None}
        self._abandoned = newer
        for s, d in newer.items():
            self._replaceable.setdefault(s, d)
        if newer:
            log.info("restored step %d while %d newer step(s) exist (newest %d): the next save starts a new "
                     "timeline and retires them", step, len(newer), max(newer))

    def _agree(self, steps: list[int], state: Mapping[str, Any]) -> Agreed[LoadedStep]:
        from .parallel_read import ParallelRead

        exchange = self.world_size > 1 and self._parallel_restore()
        parallel = ParallelRead(self.group, exchange=exchange, memory=self.memory) if exchange or self.memory.enabled else None

        def read(c: Candidate) -> ReadAttempt[LoadedStep]:
            attempt = try_read(self.store, c.step, rank=self.rank, world_size=self.world_size, state=state,
                               parallel=parallel)
            if attempt.seen_digest is not None:
                self._seen_manifests[c.step] = attempt.seen_digest
            return attempt

        def skipped(c: Candidate, attempt: ReadAttempt[LoadedStep]) -> None:
            if c.step in self._seen_manifests:  # a new save of a skipped step replaces it
                self._replaceable[c.step] = self._seen_manifests[c.step]

        return agree(self.group, [Candidate(s) for s in steps], read, events=self.events,
                     finish=lambda c, loaded: self._load_sharded(loaded, state), on_skip=skipped, nothing=lambda details: (
                         f"none of the {len(steps)} committed checkpoint(s) under {self.storage.display()} could be "
                         f"verified and loaded by every rank: {details}. Inspect them with 'elastic-resume verify'; "
                         "move the root aside to start fresh."))

    def _parallel_restore(self) -> bool:
        setting = self.options.parallel_restore
        return not isinstance(self.storage, LocalStorage) if setting == "auto" else bool(setting)

    def _candidates(self) -> list[int]:
        """Rank 0: committed steps to try, newest first, minus crash-looping ones; counts this
        resume against the step it will try first (before loading: a crash during the load
        is a crash too)."""
        committed = self.store.committed_steps()
        if not committed or self.options.read_only:
            return committed
        candidates, dropped = self.store.resume_candidates(committed, self.max_resumes_per_step)
        self._replaceable.update(dropped)  # a new save of a dropped step replaces it
        return candidates

    def _load_sharded(self, loaded: LoadedStep, state: Mapping[str, Any]) -> str | None:
        """Collective, once every rank agreed on a step with sharded leaves: load them through DCP
        into the live state's own DTensors (DCP reshards when the sharding changed). DCP
        propagates any rank's failure to all ranks, so every rank returns the same verdict."""
        if not loaded.has_sharded:
            return None
        from .._torch_compat import dcp_exception
        from . import sharded
        from .format import flatten
        from .saving import first_line
        from .state import snapshot_state

        try:
            sharded.init_optimizer_states(dict(state))
            targets: dict[str, Any] = {}
            replicated, _ = snapshot_state(state)
            flatten(replicated, name="state", sharded=targets)
            sharded.load_sharded(targets, sharded.StoreReader(self.store, loaded.manifest), process_group(self.group))
            loaded.finish_sharded(targets)
        except StateError:
            raise
        except (Exception, dcp_exception()) as e:  # noqa: BLE001 - DCP wraps every rank's failure
            return f"sharded state could not be loaded: {first_line(e)}"
        return None

    def _apply(self, state: MutableMapping[str, Any], loaded: LoadedStep) -> None:
        """Load ``loaded`` into ``state`` (all or nothing, see ``state.apply_state``). Per-rank
        values of another world size are resharded, not loaded."""
        assert loaded.replicated is not None
        tree = dict(loaded.replicated)
        reseeded: list[str] = []
        if loaded.per_rank is not None:
            if loaded.reseed:
                reseeded = [k for k in loaded.per_rank if k in state]
                for key in reseeded:
                    state[key].reshard(loaded.per_rank[key], self.rank, self.world_size)
                if reseeded:
                    self.events.emit(Event.PER_RANK_RESEEDED, step=loaded.step, keys=reseeded,
                                     saved_world_size=loaded.manifest.world_size, world_size=self.world_size)
            else:
                tree.update(loaded.per_rank)
        rest = {k: v for k, v in state.items() if k not in reseeded}
        apply_state(rest, tree, step=loaded.step)
        for k, v in rest.items():  # plain values were replaced in the copy
            state[k] = v

    def allow_replace(self, step: int) -> None:
        """Let the next save of ``step`` replace its committed manifest: the one this process
        restored (a rollback re-commits its anchor with the recovery state), or, if this
        process never read it, the one that stands now (an explicit overwrite, as Lightning
        does when it saves a path again). Rank 0 holds the proof; other ranks ignore it."""
        if self.rank != 0:
            return
        digest = self._seen_manifests.get(step) or self.store.manifest_digest(step)
        if digest is not None:
            self._replaceable[step] = digest

    # -- for the spike guard (spike.backend.CheckpointBackend) ---------------------------------
    def checkpoint_health(self) -> list[tuple[int, bool, float | None]]:
        """Committed steps with their recorded health and loss (the guard's smoothed global
        loss), the same list on every rank (rank 0 reads, then broadcasts). A step without a
        health record counts as healthy; a step whose manifest does not validate is left out."""
        self.wait()

        def read() -> list[tuple[int, bool, float | None]]:
            found = []
            for s in self.store.committed_steps():
                try:
                    m = self.store.read_manifest(s)
                except CheckpointCorruptError:
                    continue
                found.append((s, *m.health_record()))
            return found

        return on_rank0(self.group, read, error=lambda m: StorageError(0, m),
                        what=f"cannot read the checkpoints' health under {self.storage.display()}")

    def record_decision(self, decision: Mapping[str, Any]) -> None:
        """Collective: rank 0 writes the spike guard's rollback decision at the root, atomically,
        before the rollback is carried out (``rollback-decision.json``)."""
        write_record_together(self.group, self.storage, ROLLBACK_DECISION, dict(decision))

    def recorded_decision(self) -> Any:
        """Collective: the last rollback decision recorded at the root (untrusted JSON), or None."""
        return read_record_together(self.group, self.storage, ROLLBACK_DECISION)

    def retire_newer_than(self, step: int, *, reason: str) -> list[int]:
        """Remove every committed step newer than ``step`` (they lie on an abandoned timeline,
        e.g. after a rollback); collective, so no rank runs ahead of the deletion."""
        self.wait()

        def retire() -> list[int]:
            retired = [s for s in self.store.committed_steps() if s > step]
            for s in retired:
                self.store.retire(s)
                self.events.emit(Event.CHECKPOINT_RETIRED, step=s, reason=reason)
            return retired

        retired = on_rank0(self.group, retire, error=lambda m: StorageError(0, m),
                           what=f"cannot retire checkpoints newer than step {step} under {self.storage.display()}")
        self.memory.forget_newer_than(step)
        self._abandoned = {s: d for s, d in self._abandoned.items() if s not in retired}
        return retired

    def protect(self, steps: Collection[int]) -> None:
        """Retention keeps exactly these steps whatever ``keep_last`` says (the rollback anchors
        of today and tomorrow); replaces the previous set."""
        self._protected = frozenset(steps)

    def allow_recovery_drift(self, patterns: Iterable[str]) -> None:
        """Fingerprint names that a recovery itself changes (a rollback scaling the LR): not
        reported as drift when this run, or one resumed from it, restores."""
        self._recovery_drift += [p for p in patterns if p not in self._recovery_drift]

    # -- queries ------------------------------------------------------------------------------
    def latest(self, *, full: bool = True) -> int | None:
        """The newest committed step that verifies (full: digests too), or None."""
        self.wait()
        return self.store.latest(full=full)

    def committed_steps(self) -> list[int]:
        return self.store.committed_steps()

