"""The checkpoint manager: rank-coordinated save and agreed restore of a training state.

Save: every rank encodes its state, all ranks agree on an attempt id, each writes its own file(s)
under that attempt, every rank reports success or the failing file, and only then rank 0 commits
the manifest (create-only). Restore: candidates are the committed steps newest first; every rank
verifies and decodes what it needs, and one ``all_reduce(MIN)`` of [ok, manifest hash, -hash]
decides whether all ranks succeeded on the same manifest; otherwise the next older step is tried.

The collectives live in ``collectives.py``; the bytes in ``store.py``/``storage.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from .collectives import Group, default_group
from .errors import (
    CheckpointCorruptError,
    CheckpointSaveError,
    CommitConflictError,
    ConfigError,
    ElasticResumeError,
    NoCheckpointError,
    StateError,
    StorageError,
)
from .events import EventLog
from .serialization import decode, encode
from .storage import open_storage
from .store import CheckpointStore, FileEntry, Manifest, new_attempt_id, rank_file


def _has_state_dict(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def snapshot_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The plain tree to save: ``state_dict()`` of stateful objects, other values as they are."""
    if not isinstance(state, Mapping):
        raise StateError(f"state must be a dict of name -> value, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise StateError(f"state keys must be strings, got {key!r}")
        out[key] = value.state_dict() if _has_state_dict(value) else value
    return out


def apply_state(state: MutableMapping[str, Any], loaded: Mapping[str, Any], *, step: int) -> None:
    """Restore in place: ``load_state_dict`` on stateful objects, replace plain values."""
    missing = [k for k in state if k not in loaded]
    if missing:
        raise StateError(
            f"checkpoint step {step} has no entry for {', '.join(map(repr, missing))} "
            f"(it holds {', '.join(map(repr, loaded)) or 'nothing'}); the state passed to restore() "
            "must use the same keys as the state that was saved"
        )
    for key in list(state):
        value = state[key]
        if _has_state_dict(value):
            try:
                value.load_state_dict(loaded[key])
            except Exception as e:  # noqa: BLE001 - any mismatch is reported with its key
                raise StateError(f"checkpoint step {step}: cannot load state[{key!r}]: {e}") from e
        else:
            state[key] = loaded[key]


def _manifest_hash(manifest: Manifest | None) -> int:
    # 62 bits of the manifest checksum, so [h, -h] fit an int64 all_reduce(MIN).
    if manifest is None:
        return 0
    return int(manifest.checksum.split(":", 1)[1][:16], 16) >> 2


class CheckpointManager:
    """Save and restore a training state at a checkpoint root (local path, file:// or s3://).

    ``state`` is a dict whose values are objects with ``state_dict()``/``load_state_dict()``
    (modules, optimizers, schedulers, samplers; restored in place) or plain values (tensors,
    numbers, strings, containers of those; replaced in the dict on restore).

    In a ``torch.distributed`` job every rank constructs the manager and calls ``save``/``restore``
    together; each rank's state goes to its own file and rank 0 commits once every rank wrote.
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
    ) -> None:
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ConfigError(f"keep_last must be a positive integer or None (got {keep_last!r})")
        if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
            raise ConfigError(f"keep_every must be a positive integer or None (got {keep_every!r})")
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
        self.protected_steps: set[int] = set()
        self.last_committed: int | None = None
        # Rank 0 creates the root and proves it can write before any training happens, so a
        # bad root fails in the first second rather than at the first save an hour in.
        if self.rank == 0:
            self.storage.ensure_root(create=not read_only, probe_write=not read_only)

    # -- save ---------------------------------------------------------------------------------
    def save(self, step: int, state: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None) -> Manifest:
        """Write ``state`` as checkpoint ``step`` on every rank and commit it. Returns the
        committed manifest. Raises on every rank if any rank failed; nothing is committed then."""
        if self.read_only:
            raise ConfigError(f"checkpoint manager for {self.root} was opened read_only; save() is not allowed")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"step must be a non-negative integer (got {step!r})")
        started = time.perf_counter()
        attempt = self.group.broadcast_object(new_attempt_id() if self.rank == 0 else None)
        self.events.emit("save_started", step=step, attempt=attempt)
        rel = rank_file(attempt, self.rank)
        outcome: tuple[str, Any]
        try:
            encoded = encode(snapshot_state(state), name="state")
            self.store.prepare(step, attempt)
            entry = self.store.write_file(step, rel, encoded, rank=self.rank)
            outcome = ("ok", entry.to_json())
        except Exception as e:  # noqa: BLE001 - reported to every rank below, then raised
            outcome = ("error", f"rank {self.rank} failed writing {self.storage.display(rel)}: {e}")
            local_error: BaseException | None = e
        else:
            local_error = None
        outcomes = self.group.all_gather_object(outcome)
        errors = [msg for kind, msg in outcomes if kind == "error"]
        if errors:
            self.events.emit("save_failed", step=step, attempt=attempt, errors=errors)
            raise CheckpointSaveError(
                f"checkpoint step {step} was not committed: " + "; ".join(errors)
            ) from local_error
        files = [FileEntry(**payload) for _, payload in outcomes]
        manifest = Manifest(
            step=step,
            attempt=attempt,
            world_size=self.world_size,
            files=files,
            metadata=dict(metadata or {}),
        )
        commit_error = None
        if self.rank == 0:
            try:
                self.store.commit(manifest)
            except ElasticResumeError as e:
                commit_error = str(e)
        commit_error = self.group.broadcast_object(commit_error)
        if commit_error is not None:
            self.events.emit("save_failed", step=step, attempt=attempt, errors=[commit_error])
            raise CommitConflictError(commit_error)
        seconds = time.perf_counter() - started
        self.last_committed = step
        self.events.emit(
            "save_committed", step=step, attempt=attempt, bytes=manifest.total_bytes,
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
                protect=self.protected_steps, newest_verified=step,
            )
        except Exception as e:  # noqa: BLE001 - clean-up failure must not fail training
            self.events.emit("prune_failed", step=step, error=str(e))

    # -- restore ------------------------------------------------------------------------------
    def _load_candidate(self, step: int) -> tuple[Manifest | None, dict[str, Any] | None, str | None, str | None]:
        """Read, verify and decode this rank's part of ``step``. Returns (manifest, tree, file, why)."""
        try:
            manifest = self.store.read_manifest(step)
            entries = manifest.files_for_rank(self.rank)
            if not entries:
                return manifest, None, None, (
                    f"no file for rank {self.rank} (saved at world size {manifest.world_size}, "
                    f"now {self.world_size})"
                )
            tree: dict[str, Any] = {}
            for entry in entries:
                where = self.storage.display(f"step-{step:012d}/{entry.path}")
                buf = self.store.read_file(manifest, entry)
                try:
                    part = decode(buf, where=where)
                except CheckpointCorruptError as e:
                    raise CheckpointCorruptError(step, where, e.reason) from None
                if not isinstance(part, dict):
                    raise CheckpointCorruptError(step, where, "data file does not hold a state dict")
                tree.update(part)
            return manifest, tree, None, None
        except CheckpointCorruptError as e:
            return None, None, e.file, e.reason
        except (StorageError, OSError) as e:
            return None, None, None, f"unreadable: {e}"

    def restore(self, state: MutableMapping[str, Any], *, step: int | None = None) -> int | None:
        """Restore ``state`` in place from the newest step every rank can verify and load (or
        exactly ``step``). Returns the step, or None when no checkpoint was ever committed.
        Corrupt steps are reported and skipped; if committed steps exist but none loads, raises
        NoCheckpointError rather than silently starting over."""
        started = time.perf_counter()
        candidates = self.group.broadcast_object(
            (self.store.committed_steps() if step is None else [step]) if self.rank == 0 else None
        )
        if not candidates:
            self.events.emit("restore_none", root=self.storage.display(), reason="no committed checkpoint")
            return None
        skipped: list[dict[str, Any]] = []
        for cand in candidates:
            manifest, tree, file, why = self._load_candidate(cand)
            h = _manifest_hash(manifest) if tree is not None else 0
            ok, hmin, neg_hmax = self.group.all_reduce_min([1 if tree is not None else 0, h, -h])
            if ok and hmin == -neg_hmax:
                assert tree is not None and manifest is not None
                apply_state(state, tree, step=cand)
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
            self.events.emit("restore_fallback", step=cand, file=file, reason=why)
        raise NoCheckpointError(
            f"none of the {len(candidates)} committed checkpoint(s) under {self.storage.display()} "
            "could be verified and loaded by every rank: "
            + "; ".join(f"step {s['step']}: {s['file'] or ''} {s['reason']}".replace("  ", " ") for s in skipped)
            + ". Inspect them with 'elastic-resume verify'; move the root aside to start fresh."
        )

    # -- queries ------------------------------------------------------------------------------
    def latest(self, *, full: bool = True) -> int | None:
        """The newest committed step that verifies (full: digests too), or None."""
        return self.store.latest(full=full)

    def committed_steps(self) -> list[int]:
        return self.store.committed_steps()
