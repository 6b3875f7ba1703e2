"""Writing a step: the one writer behind ``CheckpointManager.save`` (every rank of a job) and
``ElasticCheckpointIO.save_checkpoint`` (Lightning's rank 0 alone, a world of one).

A save has two halves:

- the foreground (:func:`prepare`, in the caller's thread, the training loop's stall): take
  ``state_dict()``s, split them into a structure and its tensors, decide which replicated
  tensors this rank writes (:func:`assign_tensors`, pure: every rank computes the same answer
  without talking) and, for a background save, copy exactly those tensors, this rank's own
  state and its shards into the staging buffers. No collective runs here, so the foreground
  never waits on another rank.
- the write and the commit (:meth:`StepWriter._write_and_commit`, inline or in a background
  thread): ranks agree on an attempt id, each writes its files under it, every rank's outcome
  (its files, or the failing file) reaches every rank, and only when all succeeded on the same
  structure does rank 0 commit the manifest, create-only (or by compare-and-swap when it holds
  the proof that the step it replaces is the unusable one). The commit's outcome is broadcast,
  so every rank returns or raises the same.

Data files all hold ``{"skeleton": <tree with tensor refs> | None, "tensors": {index: tensor}}``
(the structure travels in rank 0's shared file).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import heartbeat, replicas
from .._torch_compat import dcp_exception
from ..collectives import Group, InGroup, agree_on, process_group
from ..contract import Event, ExitCode
from ..errors import CheckpointSaveError, CommitConflictError, ElasticResumeError, ReplicaDivergenceError, StateError
from ..events import EventLog
from ..storage import digest_bytes
from .format import Payload, as_cpu_contiguous, encode, flatten, tensor_names
from .layout import FileKind, data_file, new_attempt_id, step_dir
from .manifest import FileEntry, Manifest, canonical_json
from .memory_tier import HeldBytes, MemoryTier
from .staging import Stager
from .state import snapshot_state
from .store import CheckpointStore

#: How the replicated tensors are spread over the shared files (recorded in every manifest).
LAYOUT = "spread-v1"


def assign_tensors(sizes: list[int], world_size: int) -> list[int]:
    """Deal tensors out to ranks so each writes about 1/world_size of the bytes: largest first,
    each to the least-loaded rank (ties to the lower rank). Pure and deterministic, so every rank
    computes the same assignment without talking."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


@dataclass
class SaveJob:
    """What one rank writes for one step, taken in the foreground."""

    step: int
    metadata: dict[str, Any]
    health: dict[str, Any]
    started: float
    attempt: str = ""
    #: The replicated state's structure, and [shape, dtype] of each of its tensors (every rank
    #: holds these, so rank 0 can refuse to commit ranks that disagree on the structure).
    skeleton: Any = None
    shapes: list[list[Any]] = field(default_factory=list)
    #: Each replicated tensor's name in the data files (its place in the state: ``model.fc.weight``).
    names: list[str] = field(default_factory=list)
    #: The replicated tensors this rank writes, by index (staged copies for a background save).
    mine: dict[int, torch.Tensor] = field(default_factory=dict)
    per_rank_skeleton: Any = None
    per_rank_tensors: list[torch.Tensor] = field(default_factory=list)
    sharded: dict[str, torch.Tensor] = field(default_factory=dict)  # DTensor leaves, by path
    fingerprint: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: Digests of the parameters every rank holds a copy of (DDP replicas), taken with the
    #: snapshot: a step whose ranks disagree on them is never committed.
    replicas: replicas.Digests | None = None
    error: BaseException | None = None  # a failure before writing (e.g. an unsupported value)
    #: The files this rank wrote, copied for the memory tier (held once the commit stands).
    held: dict[str, HeldBytes] = field(default_factory=dict)


def prepare(job: SaveJob, state: Mapping[str, Any], *, rank: int, world_size: int, stager: Stager | None) -> None:
    """The foreground of a save: snapshot ``state``, keep what this rank writes, and (``stager``
    given: a background save) copy it into the staging buffers. No collective."""
    replicated, per_rank = snapshot_state(state)
    if world_size > 1:
        job.replicas = replicas.state_digests(state)
    sharded: dict[str, torch.Tensor] | None = {} if world_size > 1 else None
    paths: list[str] = []
    skeleton, tensors = flatten(replicated, name="state", sharded=sharded, paths=paths)
    job.names = tensor_names(paths, "state")
    pr_skeleton, pr_tensors = flatten(per_rank, name="state")
    sharded = sharded or {}
    owner = assign_tensors([t.numel() * t.element_size() for t in tensors], world_size)
    mine = {i: t for i, t in enumerate(tensors) if owner[i] == rank}
    job.shapes = [[list(t.shape), str(t.dtype)] for t in tensors]
    if stager is None:
        mine = {i: as_cpu_contiguous(t) for i, t in mine.items()}
        pr_tensors = [as_cpu_contiguous(t) for t in pr_tensors]
    else:
        from .sharded import local_shard, restage_dtensor

        locals_ = [local_shard(dt) for dt in sharded.values()]
        staged = stager.stage([*mine.values(), *pr_tensors, *locals_])
        n, m = len(mine), len(pr_tensors)
        mine = dict(zip(mine, staged[:n]))
        pr_tensors = staged[n : n + m]
        sharded = {k: restage_dtensor(dt, buf) for (k, dt), buf in zip(sharded.items(), staged[n + m :])}
    job.skeleton, job.mine, job.sharded = skeleton, mine, sharded
    job.per_rank_skeleton, job.per_rank_tensors = pr_skeleton, pr_tensors
    job.extra = {"replicated_keys": sorted(replicated), "per_rank_keys": sorted(per_rank),
                 "replicated_tensors": len(tensors), "layout": LAYOUT}


class StepWriter(InGroup):
    """Writes and commits steps over ``group``, one at a time; a background save runs in one
    thread of its own, and the next save, :meth:`wait` or interpreter exit waits for it."""

    def __init__(self, group: Group, events: EventLog, memory: MemoryTier | None = None) -> None:
        self.group = group
        self.events = events
        #: Where committed steps' files stay in host RAM (None or keep=0: nowhere).
        self.memory = memory if memory is not None and memory.enabled else None
        self.stager = Stager()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[Any] | None = None
        self.pending_step: int | None = None
        atexit.register(_wait_at_exit, weakref.ref(self))

    def save(
        self,
        store: CheckpointStore,
        step: int,
        state: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
        health: Mapping[str, Any] | None = None,
        fingerprint: Callable[[], dict[str, Any]] | None = None,
        blocking: bool = True,
        replace: str | None = None,
        after_commit: Callable[[Manifest], None] | None = None,
    ) -> Manifest | None:
        """Write ``state`` as ``step`` of ``store`` and commit it (see the module's docstring).
        ``replace``: the digest of a committed manifest of ``step`` that this run proved it must
        not use (rank 0's proof; a compare-and-swap replaces exactly it). ``after_commit`` runs
        on every rank once the commit stands (rank 0 prunes there)."""
        self.wait()
        started = time.perf_counter()
        job = SaveJob(step=step, metadata=dict(metadata or {}), health=dict(health or {}), started=started)
        try:
            prepare(job, state, rank=self.rank, world_size=self.world_size,
                    stager=None if blocking else self.stager)
            job.fingerprint = fingerprint() if fingerprint is not None else {}
        except Exception as e:  # noqa: BLE001 - must still take part in the collectives of the write
            job.error = e
        self.events.emit(Event.SAVE_STARTED, step=step, blocking=blocking,
                         stall_s=round(time.perf_counter() - started, 4))
        if blocking:
            return self._write_and_commit(store, job, replace, after_commit)
        self.run_in_background(step, self._write_and_commit, store, job, replace, after_commit)
        return None

    def run_in_background(self, step: int, write: Callable[..., Any], *args: Any) -> None:
        """Run ``write(*args)`` (the write and commit of ``step``) in the save thread: the next
        save, :meth:`wait` or interpreter exit waits for it and raises its error."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elastic-resume-save")
        self._pending = self._executor.submit(write, *args)
        self.pending_step = step

    def wait(self) -> Manifest | None:
        """Wait for a background save; raise its error if it failed."""
        pending, self._pending = self._pending, None
        self.pending_step = None
        if pending is None:
            return None
        with heartbeat.section(heartbeat.Section.SAVE):  # waiting on a save is no hang
            return pending.result()

    @property
    def save_in_progress(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    # -- the write and the commit --------------------------------------------------------------
    def _write_my_files(self, store: CheckpointStore, job: SaveJob) -> list[FileEntry]:
        store.prepare(job.step, job.attempt)
        entries = []
        if job.mine or self.rank == 0:
            tree = {"skeleton": job.skeleton if self.rank == 0 else None, "tensors": job.mine}
            rel = data_file(job.attempt, self.rank, FileKind.SHARED)
            labels = {id(t): job.names[i] for i, t in job.mine.items()}
            entry = self._write_file(store, job, rel, encode(tree, labels=labels))
            entries.append(FileEntry(entry.path, entry.size, entry.digest, self.rank, FileKind.SHARED))
        if job.extra["per_rank_keys"]:
            tree = {"skeleton": job.per_rank_skeleton, "tensors": dict(enumerate(job.per_rank_tensors))}
            rel = data_file(job.attempt, self.rank, FileKind.RANK)
            entries.append(self._write_file(store, job, rel, encode(tree)))
        return entries

    def _write_file(self, store: CheckpointStore, job: SaveJob, rel: str, payload: Payload) -> FileEntry:
        """Write one of this rank's files; with a memory tier, from the copy it will hold."""
        if self.memory is not None:
            payload = job.held[rel] = self.memory.copy(payload)
        return store.write_file(job.step, rel, payload, rank=self.rank)

    def _write_sharded(self, store: CheckpointStore, job: SaveJob, ready: bool) -> tuple[list[FileEntry], BaseException | None]:
        """DCP's save is collective: it runs on every rank or on none."""
        has = 1 if job.sharded else 0
        all_ready, same = agree_on(self.group, ready, has)
        if not all_ready:
            return [], None
        if not same:
            return [], StateError("sharded (DTensor) state is present on some ranks but not on others")
        if not has:
            return [], None
        from . import sharded

        writer = sharded.StoreWriter(store, job.step, job.attempt, self.rank)
        try:
            sharded.save_sharded(job.sharded, writer, process_group(self.group))
        except (Exception, dcp_exception()) as e:  # noqa: BLE001 - DCP reports every rank's failure everywhere
            return [], e
        return writer.entries, None

    def _write_and_commit(self, store: CheckpointStore, job: SaveJob, replace: str | None,
                          after_commit: Callable[[Manifest], None] | None) -> Manifest:
        committed = False
        try:
            manifest = self._write_and_commit_now(store, job, replace)
            committed = True
        finally:
            if self.memory is not None and job.held:
                if committed:
                    self.memory.hold(job.step, job.attempt, job.held)
                else:
                    self.memory.release(job.held.values())
        if after_commit is not None:
            after_commit(manifest)
        return manifest

    def _write_and_commit_now(self, store: CheckpointStore, job: SaveJob, replace: str | None) -> Manifest:
        step = job.step
        job.attempt = attempt = self.group.broadcast_object(new_attempt_id() if self.rank == 0 else None)
        # Every rank must have the same replicated structure; a digest of it travels with the
        # outcome so rank 0 can refuse to commit a mix.
        shape_sig = digest_bytes(canonical_json([job.skeleton, job.shapes]))
        entries: list[FileEntry] = []
        local_error: BaseException | None = job.error
        if local_error is None:
            try:
                entries = self._write_my_files(store, job)
            except Exception as e:  # noqa: BLE001 - reported to every rank below, then raised
                local_error = e
        if self.world_size > 1:
            more, error = self._write_sharded(store, job, ready=local_error is None)
            entries += more
            local_error = local_error or error
        digests = job.replicas.values if job.replicas is not None else None
        if local_error is None:
            outcome: tuple[str, Any, str, Any] = ("ok", [e.to_json() for e in entries], shape_sig, digests)
        else:
            where = store.storage.display(f"{step_dir(step)}/{attempt}/")
            outcome = ("error", f"rank {self.rank} failed writing under {where}: {first_line(local_error)}",
                       shape_sig, digests)
        outcomes = self.group.all_gather_object(outcome)
        errors = [o[1] for o in outcomes if o[0] == "error"]
        if not errors and len({o[2] for o in outcomes}) > 1:
            errors = [
                "the replicated state differs in structure between ranks "
                f"(keys {job.extra['replicated_keys']}); wrap values that differ per rank in PerRank(...)"
            ]
        if errors:
            self.events.emit(Event.SAVE_FAILED, step=step, attempt=attempt, errors=errors)
            raise CheckpointSaveError(f"checkpoint step {step} was not committed: " + "; ".join(errors)) from local_error
        self._refuse_diverged_replicas(job, [o[3] for o in outcomes])
        files = [FileEntry(**payload) for o in outcomes for payload in o[1]]
        manifest = Manifest(
            step=step, attempt=attempt, world_size=self.world_size, files=files,
            metadata=job.metadata, fingerprint=job.fingerprint, extra=job.extra, health=job.health,
        )
        self._commit(store, manifest, replace)
        self.events.emit(
            Event.SAVE_COMMITTED, step=step, attempt=attempt, bytes=manifest.total_bytes,
            bytes_this_rank=sum(e.size for e in files if e.rank == self.rank),
            seconds=round(time.perf_counter() - job.started, 4), world_size=self.world_size,
        )
        return manifest

    def _refuse_diverged_replicas(self, job: SaveJob, per_rank: list[Any]) -> None:
        """Every rank holds the same outcomes, so every rank raises the same, or none does."""
        if job.replicas is None or any(d is None for d in per_rank):
            return
        found = replicas.disagreement(per_rank, job.replicas.names)
        if found is None:
            return
        self.events.emit(Event.REPLICA_DIVERGENCE, **found.event_fields(job.step, self.world_size, "save"))
        message = found.refusal(job.step, self.world_size)
        self.events.emit(Event.SAVE_FAILED, step=job.step, attempt=job.attempt, errors=[message])
        raise ReplicaDivergenceError(message, step=job.step, disagreement=found)

    def _commit(self, store: CheckpointStore, manifest: Manifest, replace: str | None) -> None:
        """Rank 0 writes the manifest; every rank learns the outcome and raises the same error."""
        step, attempt = manifest.step, manifest.attempt
        commit_error: tuple[str, str] | None = None
        if self.rank == 0:
            try:
                store.commit(manifest, replace=replace)
                if replace is not None:
                    self.events.emit(Event.CHECKPOINT_SUPERSEDED, step=step, attempt=attempt)
            except CommitConflictError as e:
                commit_error = ("conflict", str(e))
            except (ElasticResumeError, OSError) as e:  # disk full, permission, network
                where = store.storage.display(store.manifest_path(step))
                commit_error = ("storage", f"checkpoint step {step} was not committed: writing {where} failed: {e}")
        commit_error = self.group.broadcast_object(commit_error)
        if commit_error is not None:
            kind, message = commit_error
            self.events.emit(Event.SAVE_FAILED, step=step, attempt=attempt, errors=[message])
            raise (CommitConflictError if kind == "conflict" else CheckpointSaveError)(message)


def first_line(e: BaseException) -> str:
    """A one-line account of an error; for DCP's wrapper, the failing ranks' own errors."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, wrapped in sorted(failures.items()):
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            parts.append(f"rank {rank}: {inner}")
        return "; ".join(parts)[:1000]
    text = str(e).strip()
    for line in text.splitlines():
        if "Error" in line or "error" in line:
            return line.strip()[:500]
    return text.splitlines()[0][:500] if text else type(e).__name__


def _wait_at_exit(ref: weakref.ref[StepWriter]) -> None:
    """A background save still running at interpreter exit is finished, not abandoned."""
    writer = ref()
    if writer is None or writer._pending is None:
        return
    step = writer.pending_step
    try:
        writer.wait()
    except Exception as e:  # noqa: BLE001 - nobody is left to raise it to: say so and fail
        writer.events.emit(Event.SAVE_FAILED, step=step, errors=[f"background save failed at exit: {e}"])
        print(f"elastic-resume: the background save of checkpoint step {step} failed at interpreter exit "
              f"and was not committed: {e}; exiting with status {int(ExitCode.SAVE_FAILED)}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        # atexit cannot change the exit status any other way; a process whose last save was
        # lost must not report success (the launcher then restarts from the last commit).
        os._exit(ExitCode.SAVE_FAILED)
