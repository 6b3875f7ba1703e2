"""The checkpoint manager: rank-coordinated save and agreed restore of a training state.

Save (every rank calls it): the state is split into replicated values (the same on every rank:
model, optimizer, scheduler, counters, sampler position) and per-rank values (RNG streams,
``PerRank``). The replicated tensors are dealt out across ranks by size, so N ranks each write
about 1/N of the bytes; per-rank values are written by their rank. Ranks agree on an attempt id,
write under it, report success or the failing file to everyone, and only then rank 0 commits
the manifest (create-only). With ``blocking=False`` the tensors are first copied into reusable
CPU buffers and the writing and commit run in a background thread.

Restore: candidates are the committed steps newest first (rank 0's listing, broadcast); every
rank reads the shared files and its own, verifying digests as bytes arrive, and one
``all_reduce(MIN)`` of [ok, manifest hash, -hash] decides whether every rank succeeded on the
same manifest; otherwise the next older step is tried.

Data files all hold ``{"skeleton": <tree with tensor refs> | None, "tensors": {index: tensor}}``.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
import time
import weakref
from collections.abc import Iterable, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import drift as drift_report
from . import fingerprint as fingerprints
from .collectives import Group, default_group
from .errors import (
    CheckpointCorruptError,
    CheckpointSaveError,
    CommitConflictError,
    ConfigError,
    DriftError,  # noqa: F401 - importable from here as before
    ElasticResumeError,
    NoCheckpointError,
    StateError,
    StorageError,
)
from .events import EventLog
from .serialization import as_cpu_contiguous, encode, flatten, unflatten
from .state import is_per_rank
from .storage import digest_bytes, open_storage
from .store import (
    CheckpointStore,
    FileEntry,
    Manifest,
    canonical_json,
    data_file,
    new_attempt_id,
    step_dir,
)

#: Resumes from one step, without a newer commit in between, before restore falls back to an
#: older step (the launcher sets the variable from ``--er-max-resumes-per-step``; 0 disables).
MAX_RESUMES_ENV = "ER_MAX_RESUMES_PER_STEP"
DEFAULT_MAX_RESUMES_PER_STEP = 3
#: Exit status of a process whose background save failed at interpreter exit (a real failure:
#: the launcher restarts it from the last committed step).
EXIT_SAVE_FAILED = 1


def max_resumes_from_env() -> int:
    """The crash-loop limit the launcher passes down (``--er-max-resumes-per-step``)."""
    raw = os.environ.get(MAX_RESUMES_ENV, str(DEFAULT_MAX_RESUMES_PER_STEP))
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{MAX_RESUMES_ENV}={raw!r} is not an integer") from None


def _has_state_dict(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def snapshot_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(replicated, per_rank) plain trees: ``state_dict()`` of stateful objects, other values as
    they are."""
    if not isinstance(state, Mapping):
        raise StateError(f"state must be a dict of name -> value, got {type(state).__name__}")
    replicated: dict[str, Any] = {}
    per_rank: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise StateError(f"state keys must be strings, got {key!r}")
        target = per_rank if is_per_rank(value) else replicated
        target[key] = value.state_dict() if _has_state_dict(value) else value
    return replicated, per_rank


def apply_state(state: MutableMapping[str, Any], loaded: Mapping[str, Any], *, step: int) -> None:
    """Restore in place: ``load_state_dict`` on stateful objects, replace plain values."""
    missing = [k for k in state if k not in loaded]
    if missing:
        raise StateError(
            f"checkpoint step {step} has no entry for {', '.join(map(repr, missing))} "
            f"(it holds {', '.join(map(repr, loaded)) or 'nothing'}); the state passed to restore() "
            "must use the same keys as the state that was saved"
        )
    # All or nothing as far as it can be known in advance: every module's and optimizer's
    # saved state is checked against the live object before anything is loaded, so a mismatch
    # leaves the live state untouched; plain values are replaced only after every load worked.
    for key in state:
        problem = _mismatch(state[key], loaded[key])
        if problem:
            raise StateError(f"checkpoint step {step}: cannot load state[{key!r}]: {problem}; nothing was loaded")
    for key in list(state):
        value = state[key]
        if _has_state_dict(value):
            try:
                value.load_state_dict(loaded[key])
            except Exception as e:  # noqa: BLE001 - any mismatch is reported with its key
                raise StateError(f"checkpoint step {step}: cannot load state[{key!r}]: {e}") from e
    for key in list(state):
        if not _has_state_dict(state[key]):
            state[key] = loaded[key]


def _mismatch(live: Any, saved: Any) -> str | None:
    """Why ``saved`` cannot be loaded into ``live`` (a module or an optimizer), or None."""
    if isinstance(live, torch.nn.Module):
        if not isinstance(saved, Mapping):
            return f"the checkpoint holds {type(saved).__name__}, not a module state dict"
        own = live.state_dict()
        missing = [k for k in own if k not in saved]
        unexpected = [k for k in saved if k not in own]
        if missing or unexpected:
            return (f"missing keys {missing[:5]}" if missing else "") + (", " if missing and unexpected else "") + (
                f"unexpected keys {unexpected[:5]}" if unexpected else "")
        for k, t in own.items():
            v = saved[k]
            if isinstance(t, torch.Tensor) and isinstance(v, torch.Tensor) and t.shape != v.shape:
                return f"{k} has shape {tuple(v.shape)} in the checkpoint, {tuple(t.shape)} in the model"
    elif isinstance(live, torch.optim.Optimizer):
        groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
        if not isinstance(groups, list) or not isinstance(saved.get("state"), Mapping):
            return "the checkpoint holds no optimizer state dict"
        if len(groups) != len(live.param_groups) or any(
                not isinstance(g, Mapping) or len(g.get("params", ())) != len(lg["params"])
                for g, lg in zip(groups, live.param_groups)):
            return "the optimizer's parameter groups differ in number or size from the checkpoint's"
    return None


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


def _manifest_hash(manifest: Manifest | None) -> int:
    # 62 bits of the manifest checksum, so [h, -h] fit an int64 all_reduce(MIN).
    if manifest is None:
        return 0
    return int(manifest.checksum.split(":", 1)[1][:16], 16) >> 2


class _Stager:
    """Reusable CPU buffers for async saves. The first save allocates and touches them (so page
    faults are paid once, not in the training loop's stall); later saves only copy."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    def stage(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        pin = torch.cuda.is_available()
        any_cuda = False
        for i, t in enumerate(tensors):
            buf = self.buffers[i] if i < len(self.buffers) else None
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin and t.is_cuda)
                if buf.numel():
                    buf.view(-1).view(torch.uint8).zero_() if buf.dtype != torch.bool else buf.zero_()
                if i < len(self.buffers):
                    self.buffers[i] = buf
                else:
                    self.buffers.append(buf)
            any_cuda |= t.is_cuda
            buf.copy_(t, non_blocking=t.is_cuda)
            out.append(buf)
        if any_cuda:
            torch.cuda.synchronize()
        return out


@dataclass
class _SaveJob:
    step: int
    attempt: str
    metadata: dict[str, Any]
    started: float
    health: dict[str, Any] = field(default_factory=dict)
    replicated_skeleton: Any = None
    replicated_tensors: list[torch.Tensor] = field(default_factory=list)
    per_rank_skeleton: Any = None
    per_rank_tensors: list[torch.Tensor] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    sharded: dict[str, torch.Tensor] = field(default_factory=dict)  # DTensor leaves, by path
    error: BaseException | None = None  # a failure before writing (e.g. an unsupported value)


class CheckpointManager:
    """Save and restore a training state at a checkpoint root (local path, file:// or s3://).

    ``state`` is a dict whose values are objects with ``state_dict()``/``load_state_dict()``
    (modules, optimizers, schedulers, samplers; restored in place) or plain values (tensors,
    numbers, strings, containers of those; replaced in the dict on restore). Values are
    replicated unless marked per-rank (``RNGState``, ``PerRank``).

    In a ``torch.distributed`` job every rank constructs the manager and calls ``save`` and
    ``restore`` together. Coordination runs on a gloo group of its own with ``collective_timeout_s``,
    so a dead rank turns into an error, never a hang.

    Drift: ``config`` (your resolved training config) and ``data_description`` go into the
    manifest's fingerprint with versions, world size, parameter shapes and optimizer settings.
    On restore every difference is reported (``drift="warn"``), or fails the restore
    (``"fail"``), except names matching ``drift_allow`` globs (e.g. ``"versions.*"``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        event_log: EventLog | str | os.PathLike[str] | None = None,
        read_only: bool = False,
        group: Group | None = None,
        collective_timeout_s: float = 600.0,
        config: Mapping[str, Any] | None = None,
        data_description: Any = None,
        drift: str = "warn",
        drift_allow: Iterable[str] = (),
        max_resumes_per_step: int | None = None,
    ) -> None:
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ConfigError(f"keep_last must be a positive integer or None (got {keep_last!r})")
        if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
            raise ConfigError(f"keep_every must be a positive integer or None (got {keep_every!r})")
        drift_report.check_policy(drift, "CheckpointManager")
        self.group = group if group is not None else default_group(collective_timeout_s)
        self.rank = self.group.rank
        self.world_size = self.group.world_size
        if isinstance(event_log, EventLog):
            self.events = event_log
        elif event_log is not None:
            self.events = EventLog(event_log, rank=self.rank)
        else:
            self.events = EventLog.from_env(rank=self.rank)
        self.root = os.fspath(root)
        self.storage = open_storage(self.root, dict(storage_options or {}))
        self.store = CheckpointStore(self.storage, events=self.events)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.read_only = read_only
        self.config = dict(config) if config is not None else None
        self.data_description = data_description
        self.drift = drift
        self.drift_allow = list(drift_allow)
        self.protected_steps: set[int] = set()
        self.max_resumes_per_step = max_resumes_from_env() if max_resumes_per_step is None else max_resumes_per_step
        # Committed steps this incarnation proved it must not use (skipped as unloadable by
        # restore, dropped by the crash-loop fallback, a rollback anchor to re-commit), each
        # with the digest of the manifest it judged: a new save of such a step replaces exactly
        # that manifest, and nothing someone else committed there since (rank 0 only).
        self._replaceable: dict[int, str] = {}
        # Raw digest of every manifest this process read while restoring, by step.
        self._seen_manifests: dict[int, str] = {}
        self.last_committed: int | None = None
        self.last_drift: list[str] = []  # the drift report's lines of the last restore
        self._stager = _Stager()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[Manifest] | None = None
        self._pending_step: int | None = None
        # Rank 0 creates the root and proves it can write before any training happens, so a
        # bad root fails in the first second rather than at the first save an hour in.
        if self.rank == 0:
            self.storage.ensure_root(create=not read_only, probe_write=not read_only)
        atexit.register(_wait_at_exit, weakref.ref(self))

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
        failed, and then nothing is committed. ``blocking=False``: returns once the state is
        copied into reusable CPU buffers; writing and the commit continue in the background, and
        the next ``save``/``restore``/``wait()`` (or interpreter exit) waits for it and raises
        its error if it failed."""
        if self.read_only:
            raise ConfigError(f"checkpoint manager for {self.root} was opened read_only; save() is not allowed")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"step must be a non-negative integer (got {step!r})")
        self.wait()
        started = time.perf_counter()
        job = _SaveJob(step=step, attempt="", metadata=dict(metadata or {}), started=started,
                       health=dict(health or {}))
        try:
            self._prepare(job, state, blocking)
        except Exception as e:  # noqa: BLE001 - must still take part in the collectives below
            job.error = e
        job.attempt = self.group.broadcast_object(new_attempt_id() if self.rank == 0 else None)
        attempt = job.attempt
        self.events.emit("save_started", step=step, attempt=attempt, blocking=blocking,
                         stall_s=round(time.perf_counter() - started, 4))
        if blocking:
            return self._write_and_commit(job)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elastic-resume-save")
        self._pending = self._executor.submit(self._write_and_commit, job)
        self._pending_step = step
        return None

    def _prepare(self, job: _SaveJob, state: Mapping[str, Any], blocking: bool) -> None:
        """Everything that must happen before save() returns: take state_dicts, split them into
        skeleton and tensors, and (async) copy the tensors into the reusable staging buffers."""
        replicated, per_rank = snapshot_state(state)
        sharded: dict[str, torch.Tensor] | None = {} if self.world_size > 1 else None
        rep_skel, rep_tensors = flatten(replicated, name="state", sharded=sharded)
        pr_skel, pr_tensors = flatten(per_rank, name="state")
        sharded = sharded or {}
        if blocking:
            rep_tensors = [as_cpu_contiguous(t) for t in rep_tensors]
            pr_tensors = [as_cpu_contiguous(t) for t in pr_tensors]
        else:
            locals_ = [dt.to_local() for dt in sharded.values()]
            staged = self._stager.stage(rep_tensors + pr_tensors + locals_)
            n, m = len(rep_tensors), len(pr_tensors)
            rep_tensors, pr_tensors = staged[:n], staged[n : n + m]
            sharded = {k: _restage_dtensor(dt, buf) for (k, dt), buf in zip(sharded.items(), staged[n + m :])}
        job.sharded = sharded
        job.replicated_skeleton, job.replicated_tensors = rep_skel, rep_tensors
        job.per_rank_skeleton, job.per_rank_tensors = pr_skel, pr_tensors
        job.fingerprint = fingerprints.compute(
            state, world_size=self.world_size, config=self.config, data_description=self.data_description
        )
        job.extra = {
            "replicated_keys": sorted(replicated), "per_rank_keys": sorted(per_rank),
            "replicated_tensors": len(rep_tensors), "layout": "spread-v1",
        }

    def wait(self) -> Manifest | None:
        """Wait for a background save; raise its error if it failed."""
        pending, self._pending = self._pending, None
        self._pending_step = None
        if pending is None:
            return None
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

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _write_my_files(self, job: _SaveJob) -> list[FileEntry]:
        sizes = [t.numel() * t.element_size() for t in job.replicated_tensors]
        owner = assign_tensors(sizes, self.world_size)
        mine = {i: t for i, t in enumerate(job.replicated_tensors) if owner[i] == self.rank}
        self.store.prepare(job.step, job.attempt)
        entries = []
        if mine or self.rank == 0:
            tree = {"skeleton": job.replicated_skeleton if self.rank == 0 else None, "tensors": mine}
            rel = data_file(job.attempt, self.rank, "shared")
            entry = self.store.write_file(job.step, rel, encode(tree), rank=self.rank)
            entries.append(FileEntry(entry.path, entry.size, entry.digest, self.rank, "shared"))
        if job.extra["per_rank_keys"]:
            tree = {"skeleton": job.per_rank_skeleton, "tensors": dict(enumerate(job.per_rank_tensors))}
            rel = data_file(job.attempt, self.rank, "rank")
            entries.append(self.store.write_file(job.step, rel, encode(tree), rank=self.rank))
        return entries

    def _write_and_commit(self, job: _SaveJob) -> Manifest:
        step, attempt = job.step, job.attempt
        # Every rank must have the same replicated structure; a digest of it travels with the
        # outcome so rank 0 can refuse to commit a mix.
        shape_sig = digest_bytes(canonical_json([
            job.replicated_skeleton, [[list(t.shape), str(t.dtype)] for t in job.replicated_tensors]
        ]))
        entries: list[FileEntry] = []
        local_error: BaseException | None = None
        try:
            if job.error is not None:
                raise job.error
            entries = self._write_my_files(job)
        except Exception as e:  # noqa: BLE001 - reported to every rank below, then raised
            local_error = e
        if self.world_size > 1:
            # DCP's save is collective: run it on every rank or on none.
            has = 1 if job.sharded else 0
            ready, has_min, neg_has_max = self.group.all_reduce_min([0 if local_error else 1, has, -has])
            if ready and has_min == 1:
                from . import sharded

                writer = sharded.StoreWriter(self.store, step, attempt, self.rank)
                try:
                    sharded.save_sharded(job.sharded, writer, self._process_group())
                    entries += writer.entries
                except (Exception, _dcp_exception()) as e:  # noqa: BLE001 - DCP reports every rank's failure everywhere
                    local_error = e
            elif ready and has_min != -neg_has_max:
                local_error = StateError("sharded (DTensor) state is present on some ranks but not on others")
        if local_error is None:
            outcome: tuple[str, Any, str] = ("ok", [e.to_json() for e in entries], shape_sig)
        else:
            where = self.storage.display(f"{step_dir(step)}/{attempt}/")
            outcome = ("error", f"rank {self.rank} failed writing under {where}: {_first_line(local_error)}", shape_sig)
        outcomes = self.group.all_gather_object(outcome)
        errors = [o[1] for o in outcomes if o[0] == "error"]
        sigs = {o[2] for o in outcomes}
        if not errors and len(sigs) > 1:
            errors = [
                "the replicated state differs in structure between ranks "
                f"(keys {job.extra['replicated_keys']}); wrap values that differ per rank in PerRank(...)"
            ]
        if errors:
            self.events.emit("save_failed", step=step, attempt=attempt, errors=errors)
            raise CheckpointSaveError(
                f"checkpoint step {step} was not committed: " + "; ".join(errors)
            ) from local_error
        files = [FileEntry(**payload) for o in outcomes for payload in o[1]]
        manifest = Manifest(
            step=step, attempt=attempt, world_size=self.world_size, files=files,
            metadata=job.metadata, fingerprint=job.fingerprint, extra=job.extra, health=job.health,
        )
        commit_error: tuple[str, str] | None = None
        if self.rank == 0:
            replace = self._replaceable.get(step)
            try:
                self.store.commit(manifest, replace=replace)
                if replace is not None:
                    self.events.emit("checkpoint_superseded", step=step, attempt=attempt)
            except CommitConflictError as e:
                commit_error = ("conflict", str(e))
            except (ElasticResumeError, OSError) as e:  # disk full, permission, network
                where = self.storage.display(self.store.manifest_path(step))
                commit_error = ("storage", f"checkpoint step {step} was not committed: writing {where} failed: {e}")
        commit_error = self.group.broadcast_object(commit_error)
        if commit_error is not None:
            kind, message = commit_error
            self.events.emit("save_failed", step=step, attempt=attempt, errors=[message])
            raise (CommitConflictError if kind == "conflict" else CheckpointSaveError)(message)
        seconds = time.perf_counter() - job.started
        self.last_committed = step
        self._replaceable.pop(step, None)
        self.events.emit(
            "save_committed", step=step, attempt=attempt, bytes=manifest.total_bytes,
            bytes_this_rank=sum(e.size for e in files if e.rank == self.rank),
            seconds=round(seconds, 4), world_size=self.world_size,
        )
        if self.rank == 0:
            self._prune_after_save(step)
        return manifest

    def _prune_after_save(self, step: int) -> None:
        if self.keep_last is None and self.keep_every is None:
            return
        try:
            self.store.prune(
                keep_last=self.keep_last, keep_every=self.keep_every,
                protect=self.protected_steps,
            )
        except Exception as e:  # noqa: BLE001 - clean-up failure must not fail training
            self.events.emit("prune_failed", step=step, error=str(e))

    # -- restore ------------------------------------------------------------------------------
    def _per_rank_source(self, manifest: Manifest, state: Mapping[str, Any]) -> tuple[int, bool]:
        """Which saved rank's per-rank file this rank loads, and whether streams are reseeded
        (world size changed). Raises StateError naming what cannot be resharded."""
        keys = manifest.extra.get("per_rank_keys", [])
        if manifest.world_size == self.world_size or not keys:
            return self.rank, False
        stuck = [k for k in keys if k in state and not getattr(state[k], "reshardable", False)]
        if stuck:
            raise StateError(
                f"checkpoint step {manifest.step} was saved at world size {manifest.world_size} and is "
                f"restored at world size {self.world_size}, but per-rank state "
                f"{', '.join(map(repr, stuck))} cannot be resharded; restore at world size "
                f"{manifest.world_size}, or drop it from the state"
            )
        return 0, True

    def _load_candidate(self, step: int, state: Mapping[str, Any]) -> tuple[Manifest | None, dict[str, Any] | None, str | None, str | None]:
        """Read, verify and decode what this rank needs of ``step``: (manifest, tree, file, why).
        The checks are the store's own (see ``CheckpointStore.check_loadable``), so what restore
        refuses is what ``verify`` reports."""
        try:
            manifest = self.store.read_manifest(step)
        except CheckpointCorruptError as e:
            digest = self.store.manifest_digest(step)  # the proof a replacement will compare to
            if digest is not None:
                self._seen_manifests[step] = digest
            return None, None, e.file, e.reason
        self._seen_manifests[step] = manifest.raw_digest
        try:
            source, reseed = self._per_rank_source(manifest, state)
            skeleton, tensors = self.store.read_replicated(manifest)
            if manifest.files_of("dcp-meta"):
                # Sharded tensors are loaded after every rank agreed on this step (DCP's load is
                # collective); until then the structure stays a skeleton.
                tree: dict[str, Any] = {_SHARDED_SKELETON: (skeleton, tensors)}
            else:
                tree = unflatten(skeleton, tensors, where=step_dir(step))
            if not isinstance(tree, dict):
                raise CheckpointCorruptError(step, None, "the replicated state is not a dict of names")
            per_rank = self.store.read_per_rank(manifest, source)
            if per_rank is not None:
                if not isinstance(per_rank, dict):
                    raise CheckpointCorruptError(step, None, f"the per-rank state of rank {source} is not a dict of names")
                if reseed:
                    per_rank = {k: _Reseed(v) for k, v in per_rank.items()}
                tree.update(per_rank)
            return manifest, tree, None, None
        except StateError:
            raise
        except CheckpointCorruptError as e:
            return None, None, e.file, e.reason
        except (StorageError, OSError) as e:
            return None, None, None, f"unreadable: {e}"

    def read_verified(self, step: int) -> tuple[Manifest, dict[str, Any]]:
        """This rank's share of ``step`` (the replicated state and its own per-rank state), every
        byte verified, as a plain tree: no agreement with other ranks and nothing loaded into
        live objects. Raises CheckpointCorruptError naming the file that failed."""
        self.wait()
        manifest, tree, file, why = self._load_candidate(step, {})
        if manifest is None or tree is None:
            raise CheckpointCorruptError(step, file, why or "unreadable")
        return manifest, tree

    def restore(self, state: MutableMapping[str, Any], *, step: int | None = None) -> int | None:
        """Restore ``state`` in place from the newest step every rank can verify and load (or
        exactly ``step``). Returns the step, or None when no checkpoint was ever committed.
        Corrupt steps are reported and skipped; if committed steps exist but none loads, raises
        NoCheckpointError rather than silently starting over."""
        self.wait()
        started = time.perf_counter()
        current_fp = fingerprints.compute(state, world_size=self.world_size, config=self.config,
                                          data_description=self.data_description)
        listed: tuple[str, Any] | None = None
        if self.rank == 0:
            try:
                listed = ("ok", self._candidates() if step is None else [step])
            except (ElasticResumeError, OSError) as e:  # every rank must hear it, or the others hang
                listed = ("error", f"cannot list checkpoints under {self.storage.display()}: {e}")
        status, candidates = self.group.broadcast_object(listed)
        if status == "error":
            raise StorageError(0, candidates)
        if not candidates:
            self.events.emit("restore_none", root=self.storage.display(), reason="no committed checkpoint")
            return None
        skipped: list[dict[str, Any]] = []
        for cand in candidates:
            manifest, tree, file, why = self._load_candidate(cand, state)
            h = _manifest_hash(manifest) if tree is not None else 0
            ok, hmin, neg_hmax = self.group.all_reduce_min([1 if tree is not None else 0, h, -h])
            if ok and hmin == -neg_hmax and tree is not None and _SHARDED_SKELETON in tree:
                assert manifest is not None
                file, why = self._load_sharded(manifest, state, tree)
                ok = 0 if why else 1
            if ok and hmin == -neg_hmax:
                assert tree is not None and manifest is not None
                self._check_drift(manifest, current_fp, tree)
                self._apply(state, tree, manifest)
                if manifest.world_size == self.world_size:  # then every file was read by some rank
                    self.store.mark_loadable(cand, manifest.raw_digest)
                self.last_committed = cand
                self.events.emit(
                    "restored", step=cand, bytes=manifest.total_bytes,
                    seconds=round(time.perf_counter() - started, 4), skipped=skipped,
                    saved_world_size=manifest.world_size, world_size=self.world_size,
                )
                return cand
            if why is not None:
                self.store.report_corruption(cand, file, why)
            elif ok:
                why = "ranks read different manifests for this step"
            else:
                why = "another rank could not verify or load it"
            skipped.append({"step": cand, "file": file, "reason": why})
            if cand in self._seen_manifests:
                self._replaceable[cand] = self._seen_manifests[cand]
            self.events.emit("restore_fallback", step=cand, file=file, reason=why)
        raise NoCheckpointError(
            f"none of the {len(candidates)} committed checkpoint(s) under {self.storage.display()} "
            "could be verified and loaded by every rank: "
            + "; ".join(f"step {s['step']}: {s['file'] or ''} {s['reason']}".replace("  ", " ") for s in skipped)
            + ". Inspect them with 'elastic-resume verify'; move the root aside to start fresh."
        )

    def _candidates(self) -> list[int]:
        """Rank 0: committed steps to try, newest first, minus crash-looping ones; counts this
        resume against the step it will try first (before loading: a crash during the load
        is a crash too)."""
        committed = self.store.committed_steps()
        if not committed or self.read_only:
            return committed
        candidates, dropped = self.store.resume_candidates(committed, self.max_resumes_per_step)
        self._replaceable.update(dropped)  # a new save of a dropped step replaces it
        return candidates

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

    def _load_sharded(self, manifest: Manifest, state: Mapping[str, Any], tree: dict[str, Any]) -> tuple[str | None, str | None]:
        """Collective: load the DTensor leaves through DCP into the live state's own DTensors
        (DCP reshards when the sharding changed), then finish the tree. DCP propagates any
        rank's failure to all ranks, so every rank returns the same verdict."""
        from . import sharded

        skeleton, tensors = tree.pop(_SHARDED_SKELETON)
        try:
            sharded.init_optimizer_states(dict(state))
            targets: dict[str, torch.Tensor] = {}
            replicated, _ = snapshot_state(state)
            flatten(replicated, name="state", sharded=targets)
            sharded.load_sharded(targets, sharded.StoreReader(self.store, manifest), self._process_group())
            tree.update(unflatten(skeleton, tensors, where=step_dir(manifest.step), sharded=targets))
        except StateError:
            raise
        except (Exception, _dcp_exception()) as e:  # noqa: BLE001 - DCP wraps every rank's failure
            return None, f"sharded state could not be loaded: {_first_line(e)}"
        return None, None

    def _process_group(self) -> Any:
        return getattr(self.group, "group", None)

    def _apply(self, state: MutableMapping[str, Any], tree: dict[str, Any], manifest: Manifest) -> None:
        tree = {k: v for k, v in tree.items() if not (isinstance(v, _Reseed) and k not in state)}
        reseeded = [k for k, v in tree.items() if isinstance(v, _Reseed)]
        for key in reseeded:
            saved = tree.pop(key).saved
            obj = state[key]
            obj.reshard(saved, self.rank, self.world_size)  # type: ignore[attr-defined]
        if reseeded:
            self.events.emit("per_rank_reseeded", step=manifest.step, keys=reseeded,
                             saved_world_size=manifest.world_size, world_size=self.world_size)
        rest = {k: v for k, v in state.items() if k not in reseeded}
        apply_state(rest, tree, step=manifest.step)
        for k, v in rest.items():  # plain values were replaced in the copy
            state[k] = v

    def _check_drift(self, manifest: Manifest, current: dict[str, Any], tree: Any) -> None:
        self.last_drift = drift_report.check(manifest.fingerprint, current, step=manifest.step, policy=self.drift,
                                             allow=self.drift_allow, events=self.events, restored_tree=tree)

    # -- rollback support ---------------------------------------------------------------------
    def checkpoint_health(self) -> list[tuple[int, bool, float | None]]:
        """Committed steps with their recorded health and loss (the guard's smoothed global
        loss), the same list on every rank (rank 0 reads, then broadcasts). A step without a
        health record counts as healthy; a step whose manifest does not validate is left out."""
        self.wait()
        found = None
        if self.rank == 0:
            found = []
            for s in self.store.committed_steps():
                try:
                    m = self.store.read_manifest(s)
                except CheckpointCorruptError:
                    continue
                found.append((s, bool(m.health.get("healthy", True)), recorded_loss(m.health)))
        return self.group.broadcast_object(found)

    def retire_newer_than(self, step: int, *, reason: str) -> list[int]:
        """Remove every committed step newer than ``step`` (they lie on an abandoned timeline,
        e.g. after a rollback); collective, so no rank runs ahead of the deletion."""
        self.wait()
        retired = None
        if self.rank == 0:
            retired = [s for s in self.store.committed_steps() if s > step]
            for s in retired:
                self.store.retire(s)
                self.events.emit("checkpoint_retired", step=s, reason=reason)
        return self.group.broadcast_object(retired)

    # -- queries ------------------------------------------------------------------------------
    def latest(self, *, full: bool = True) -> int | None:
        """The newest committed step that verifies (full: digests too), or None."""
        self.wait()
        return self.store.latest(full=full)

    def committed_steps(self) -> list[int]:
        return self.store.committed_steps()


_SHARDED_SKELETON = "\x00sharded-skeleton"


def _dcp_exception() -> type[BaseException]:
    """torch.distributed.checkpoint's CheckpointException derives from BaseException."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _first_line(e: BaseException) -> str:
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


@dataclass
class _Reseed:
    """A per-rank value that cannot be loaded as is after a world-size change."""

    saved: Any


def _restage_dtensor(dt: torch.Tensor, local_copy: torch.Tensor) -> torch.Tensor:
    """The same DTensor (mesh, placements, global shape) over a staged copy of its local shard."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_copy, dt.device_mesh, dt.placements, run_check=False,  # type: ignore[attr-defined]
                              shape=dt.shape, stride=dt.stride())


def _wait_at_exit(ref: "weakref.ref[CheckpointManager]") -> None:
    """A background save still running at interpreter exit is finished, not abandoned."""
    mgr = ref()
    if mgr is not None and mgr._pending is not None:
        step = mgr._pending_step
        try:
            mgr.wait()
        except Exception as e:  # noqa: BLE001 - nobody is left to raise it to: say so and fail
            mgr.events.emit("save_failed", step=step, errors=[f"background save failed at exit: {e}"])
            print(f"elastic-resume: the background save of checkpoint step {step} failed at interpreter exit "
                  f"and was not committed: {e}; exiting with status {EXIT_SAVE_FAILED}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            # atexit cannot change the exit status any other way; a process whose last save was
            # lost must not report success (the launcher then restarts from the last commit).
            os._exit(EXIT_SAVE_FAILED)


def recorded_loss(health: dict[str, Any]) -> float | None:
    """The loss a checkpoint's health record carries, if it is a finite number (untrusted bytes)."""
    loss = health.get("loss")
    if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss):
        return float(loss)
    return None
