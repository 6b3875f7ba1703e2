"""Lightning's ``CheckpointIO`` over the elastic-resume store.

Lightning names checkpoints by path (``DIR/epoch=0-step=100.ckpt``, ``DIR/last.ckpt``) and saves
them from global rank 0 alone (single device, DDP; sharded strategies write their own
directories). Each such path is written as a *single file* (``single_file.py``): the archive
``torch.save`` writes, so ``torch.load(path, weights_only=True)`` and
``MyModel.load_from_checkpoint(path)`` open it, with an integrity record in the zip comment that
every load through this plugin checks first. A new path is committed create-only; a path saved
again (``last.ckpt``) is replaced in one atomic rename (object stores: one PUT) by a file that is
complete and durable first, so a crash leaves the old checkpoint or the new one, never neither.

*Bundles*, the directories earlier releases wrote at these paths (``NAME.ckpt/step-N/MANIFEST.json``
plus verified data), stay loadable, and a path that already holds one is saved again as one.
Reading happens on every rank, and which checkpoint to load is decided by the engine's agreement
protocol (``checkpoint/agreement.py``), the same one ``CheckpointManager.restore`` uses: when the
newest cannot be verified by every rank, the next older one in the directory is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
import zlib
from collections.abc import Iterable
from typing import Any

from .. import heartbeat
from ..checkpoint import single_file
from ..checkpoint.agreement import Candidate, agree
from ..checkpoint.format import encodable
from ..checkpoint.layout import manifest_path
from ..checkpoint.manager import max_resumes_from_env, open_events
from ..checkpoint.manifest import Manifest
from ..checkpoint.reading import ReadAttempt, try_read
from ..checkpoint.repository import list_bundles, written_order
from ..checkpoint.saving import StepWriter
from ..checkpoint.single_file import PathKind, path_kind
from ..checkpoint.store import CheckpointStore
from ..checkpoint.values import DecodeRules, allowed_class_names, hparams_text
from ..collectives import Group, LocalGroup, agree_on, on_rank0
from ..contract import Event
from ..errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    ConfigError,
    NoCheckpointError,
    StateError,
    StorageError,
)
from ..events import EventLog
from ..membership import current as membership
from ..storage import file_url_path, open_storage, redact, tensor_bytes
from ._compat import CHECKPOINT_IO_BASES

log = logging.getLogger("elastic_resume")

#: Key the ``ElasticResume`` callback adds to Lightning's checkpoint dict: health, metadata and
#: the drift fingerprint of the run that saved it.
CHECKPOINT_KEY = "elastic_resume"
_STATE_KEY = "checkpoint"  # the stored state is {"checkpoint": <Lightning's dict>}


@dataclasses.dataclass(frozen=True)
class Saved:
    """A checkpoint under a ModelCheckpoint directory, as its listing shows it."""

    step: int
    path: str
    created: float  #: seconds since the epoch, from its record or manifest (-inf: unknown)
    health: tuple[bool, float | None] | None  #: (healthy, loss) as recorded; None when unreadable


def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def _step_in_name(name: str) -> int:
    match = re.search(r"step=(\d+)", name)
    return int(match.group(1)) if match else 0


def normalize_path(path: str | os.PathLike[str]) -> str:
    """One spelling per checkpoint: URLs as given (minus a trailing slash), local paths absolute
    (not resolved: a ``last.ckpt`` symlink stays the link)."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = file_url_path(text)
    if "://" in text:
        return text.rstrip("/")
    return os.path.abspath(text)


def _join(parent: str, name: str) -> str:
    return f"{parent.rstrip('/')}/{name}"


def savable_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint with hyper-parameters that have no pickle-free encoding (a callable, an
    arbitrary object) in text form, each with a warning: the first save must not fail ``fit``.
    The rest of the checkpoint (weights, optimizer and loop state) is never converted."""
    if not any(key in checkpoint for key in single_file.HPARAMS_KEYS):
        return checkpoint
    out = dict(checkpoint)
    for key in single_file.HPARAMS_KEYS:
        if key in out:
            out[key] = hparams_text(out[key], f"[{key!r}]", encodable)
    return out


# Derives from the CheckpointIO of each importable namespace, so either Trainer accepts it.
class ElasticCheckpointIO(*CHECKPOINT_IO_BASES):  # type: ignore[misc]
    """Atomic, verified Lightning checkpoints on a local disk or an object store: single files
    that ``torch.load`` and ``load_from_checkpoint`` open, with an integrity record every load
    through the plugin checks (see the module's docstring).

    ``async_save=True``: ``save_checkpoint`` returns once the tensors are copied into reusable CPU
    buffers; the write and the commit continue in a background thread (the next save, load,
    removal of that path, or the end of ``fit`` waits for it and raises its error). Wrapping in
    Lightning's ``AsyncCheckpointIO`` works too, at the cost of a full clone per save.

    ``storage_options`` go to s3fs (endpoint, credentials); the environment's AWS settings
    apply otherwise. ``max_resumes_per_step``: the crash-loop limit of :meth:`resume_path`
    (default: what ``elastic-resume launch --er-max-resumes-per-step`` passes, else 3).
    ``group``: where ranks agree on what to load (default: every rank of the default process
    group; ``LocalGroup()`` loads in this process alone, with no collective).
    ``allowed_classes``: your classes (or ``"module:QualName"`` names) whose enum members and
    dataclass instances in hyper-parameters are rebuilt on load; any other class comes back in
    plain form. Nothing in a checkpoint chooses code to run.
    """

    def __init__(
        self,
        *,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
        event_log: EventLog | str | os.PathLike[str] | None = None,
        collective_timeout_s: float = 600.0,
        max_resumes_per_step: int | None = None,
        group: Group | None = None,
        allowed_classes: Iterable[str | type] = (),
    ) -> None:
        super().__init__()
        self.allowed_classes = allowed_class_names(allowed_classes)
        self.async_save = async_save
        self.max_resumes_per_step = max_resumes_from_env() if max_resumes_per_step is None else max_resumes_per_step
        self.storage_options = dict(storage_options or {})
        self.collective_timeout_s = collective_timeout_s
        self.events = open_events(event_log, int(os.environ.get("RANK", "0")))
        # Lightning saves on global rank 0 alone: one writer over a world of one for every
        # bundle (its staging buffers are allocated once and reused by every save).
        self._writer = StepWriter(LocalGroup(), self.events)
        self._active_path: str | None = None  # the bundle a background save is writing
        self._group: Group | None = group
        self._resolved: str | None = None

    # -- bundles -------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # Picklable (ddp_spawn, deepcopy, torch.save(trainer)): settings travel; what belongs to
        # this process (a background save, the staging buffers, the process group) does not.
        self.wait()
        state = dict(self.__dict__)
        state.update(_writer=None, _active_path=None, _group=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._writer = StepWriter(LocalGroup(), self.events)

    def _store(self, path: str, storage_options: dict[str, Any] | None = None) -> CheckpointStore:
        return CheckpointStore(open_storage(path, self._options(storage_options)), events=self.events,
                               allowed_classes=self.allowed_classes)

    def _options(self, per_call: dict[str, Any] | None) -> dict[str, Any]:
        """The plugin's storage options, overridden key by key by those given to one call."""
        return {**self.storage_options, **(per_call or {})}

    def saved(self, dirpath: str | os.PathLike[str]) -> list[Saved]:
        """Every checkpoint directly under ``dirpath`` that this plugin wrote (single files with
        an integrity record, committed bundles), newest step first. Reads each file's record (its
        last 64 KiB) and each bundle's manifest; their data is checked when loaded. A file whose
        record is damaged is listed (with no health) so that loading it reports why."""
        dirpath = normalize_path(dirpath)
        storage = open_storage(dirpath, self.storage_options)
        out = []
        for name, steps in list_bundles(storage).items():
            for step, committed in steps.items():
                if not committed:
                    continue
                rel = f"{name}/{manifest_path(step)}"
                try:
                    manifest = Manifest.parse(storage.read_small(rel), step=step, where=storage.display(rel))
                    out.append(Saved(step, _join(dirpath, name), manifest.created, manifest.health_record()))
                except (CheckpointCorruptError, StorageError, OSError):
                    out.append(Saved(step, _join(dirpath, name), float("-inf"), None))
        for name in single_file.checkpoint_files(dirpath, storage):
            try:
                record = single_file.record_of(storage, name)
            except CheckpointCorruptError:
                out.append(Saved(_step_in_name(name), _join(dirpath, name), float("-inf"), None))
                continue
            except (StorageError, OSError):
                continue  # removed while listing, or a link
            if record is not None:
                out.append(Saved(record.step, _join(dirpath, name), record.created, record.health_record()))
        return sorted(out, key=lambda c: (-c.step, c.path))

    def checkpoints(self, dirpath: str | os.PathLike[str]) -> list[tuple[int, str]]:
        """``(step, path)`` of every checkpoint under ``dirpath`` written by this plugin, newest
        step first (see :meth:`saved`)."""
        return [(c.step, c.path) for c in self.saved(dirpath)]

    def health(self, dirpath: str | os.PathLike[str]) -> list[tuple[int, bool, float | None, str]]:
        """``(step, healthy, recorded loss, path)`` of the checkpoints under ``dirpath`` whose
        record or manifest is readable, newest first (health as the ElasticResume callback
        recorded it)."""
        return [(c.step, *c.health, c.path) for c in self.saved(dirpath) if c.health is not None]

    def resume_path(self, dirpath: str | os.PathLike[str]) -> str | None:
        """What to pass as ``Trainer.fit(ckpt_path=...)``: the checkpoint under ``dirpath`` saved
        last, or None (a fresh start) when there is none. Loading it verifies every byte and
        agrees across ranks; when the newest cannot be loaded by every rank, the next older
        checkpoint under ``dirpath`` is used instead, and the log says which and why."""
        dirpath = normalize_path(dirpath)
        # A root that cannot be written fails now, not at the first save an hour into training.
        open_storage(dirpath, self.storage_options).ensure_root(create=True, probe_write=True)
        found = self.saved(dirpath)
        if not found and (plain := self._plain_checkpoints(dirpath)):
            self._resolved = plain[0]  # written before the plugin: loaded once, as a migration
            return self._resolved
        if not found:
            self.events.emit(Event.RESTORE_NONE, root=dirpath, reason="no committed checkpoint")
            if self.events.rank in (None, 0):  # a wrong ROOT would silently start over: say it
                log.warning("no committed checkpoint under %s: training starts from scratch", dirpath)
            return None
        # The one saved last (Lightning's ``ckpt_path="last"`` also picks by time): a new run
        # that saves into an old directory resumes its own checkpoints, not the old run's
        # higher step numbers.
        self._resolved = max(found, key=lambda c: (c.created, c.step)).path
        return self._resolved

    def _plain_checkpoints(self, dirpath: str) -> list[str]:
        """Plain ``*.ckpt`` files directly under ``dirpath`` (Lightning's default format, no
        integrity record), the one to resume first: highest ``step=N`` in the name, then
        (local) the newest, as Lightning's ``ckpt_path="last"`` would pick."""
        storage = open_storage(dirpath, self.storage_options)
        files = [rel for rel in storage.list_tree("") if "/" not in rel and rel.endswith(".ckpt")]

        def order(name: str) -> tuple[int, float]:
            mtime = 0.0
            if "://" not in dirpath:
                with contextlib.suppress(OSError):
                    mtime = os.path.getmtime(os.path.join(dirpath, name))
            return (_step_in_name(name) if "step=" in name else -1, mtime)

        if "://" not in dirpath:  # a dangling *.ckpt link (save_last="link" to a removed file) is nothing to load
            files = [f for f in files if os.path.exists(os.path.join(dirpath, f))]

        return [_join(dirpath, name) for name in sorted(files, key=order, reverse=True)]

    def group(self) -> Group:
        """The group ranks agree in (a gloo group of its own; created on first use, which must
        happen on every rank: Lightning loads checkpoints on all of them)."""
        if self._group is None:
            self._group = membership().coordination_group(self.collective_timeout_s)
        return self._group

    # -- CheckpointIO ----------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """``storage_options`` (as in ``trainer.save_checkpoint(path, storage_options=...)``)
        apply to this save, over the plugin's own."""
        with heartbeat.section(heartbeat.Section.SAVE):  # the launcher gives a save longer than a step
            self._save_checkpoint(checkpoint, path, storage_options)

    def _save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None) -> None:
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ConfigError(f"storage_options for {path} must be a dict of fsspec/s3fs options, "
                              f"got {type(storage_options).__name__}")
        path = normalize_path(path)
        self.wait()
        step = checkpoint.get("global_step", 0)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"Lightning checkpoint for {path} has global_step={step!r}; expected an integer >= 0")
        extra = checkpoint.get(CHECKPOINT_KEY) or {}
        # The run's world size: this file has one writer (global rank 0), whatever the run's.
        world = extra.get("world_size") or int(os.environ.get("WORLD_SIZE", "1") or 1)
        metadata = {"lightning_path": path.rsplit("/", 1)[-1], "epoch": checkpoint.get("epoch"),
                    "world_size": world, **extra.get("metadata", {})}
        parent, name = path.rsplit("/", 1)
        storage = open_storage(parent, self._options(storage_options))
        # A bad root fails now, naming it, not half-way through writing.
        storage.ensure_root(create=True, probe_write=True)
        if self._kind(path, storage_options) == PathKind.BUNDLE:  # written by an earlier release: saved as one again
            return self._save_bundle(checkpoint, path, storage_options, step, extra, metadata)
        started = time.perf_counter()
        try:
            checkpoint = single_file.savable(checkpoint)
        except StateError as e:
            self.events.emit(Event.SAVE_FAILED, step=step, path=path, errors=[str(e)])
            raise CheckpointSaveError(f"checkpoint {path} (step {step}) was not saved: {e}") from None
        if self.async_save:  # training may change its tensors while the copies are written
            checkpoint = single_file.staged(checkpoint, self._writer.stager)
        self.events.emit(Event.SAVE_STARTED, step=step, path=path, blocking=not self.async_save,
                         stall_s=round(time.perf_counter() - started, 4))
        fields = {"step": step, "health": extra.get("health"), "metadata": metadata}
        if not self.async_save:
            return self._write_file(storage, name, path, checkpoint, fields, started)
        self._active_path = path
        self._writer.run_in_background(step, self._write_file, storage, name, path, checkpoint, fields, started)
        return None

    def _write_file(self, storage: Any, name: str, path: str, checkpoint: dict[str, Any], fields: dict[str, Any],
                    started: float) -> None:
        """Serialize, hash and commit one single-file checkpoint (the background save runs this)."""
        replaced = None
        try:
            exists = storage.exists(name)
            if exists:
                # Lightning saves this path again (last.ckpt): the new file, complete and durable
                # (written to a temporary name and synced), takes its place in one rename (one
                # PUT), so the old checkpoint is removed only by a loadable one.
                with contextlib.suppress(CheckpointCorruptError, StorageError, OSError):
                    replaced = single_file.record_of(storage, name)
            _record, size = single_file.commit(storage, name, checkpoint, replace=exists, **fields)
        except Exception as e:
            self.events.emit(Event.SAVE_FAILED, step=fields["step"], path=path, errors=[str(e)])
            if isinstance(e, CheckpointSaveError):
                raise
            raise CheckpointSaveError(f"checkpoint {path} (step {fields['step']}) was not saved: {e}") from e
        self.events.emit(Event.SAVE_COMMITTED, step=fields["step"], path=path, bytes=size,
                         seconds=round(time.perf_counter() - started, 4), world_size=1)
        if replaced is not None:
            self.events.emit(Event.CHECKPOINT_DELETED, step=replaced.step, path=path,
                             reason=f"superseded: {path} was saved again (step {fields['step']})")

    def _save_bundle(self, checkpoint: dict[str, Any], path: str, storage_options: Any | None, step: int,
                     extra: dict[str, Any], metadata: dict[str, Any]) -> None:
        """Save ``path`` as a bundle again: a path an earlier release wrote as a directory
        (``last.ckpt`` of a run that upgraded) cannot become a file without a moment in which
        neither exists."""
        store = self._store(path, storage_options)
        # The same path saved again at the same step replaces what stands there now.
        replace = store.manifest_digest(step) if step in store.committed_steps() else None
        self._active_path = path

        def keep_newest(manifest: Manifest) -> None:
            # A path means the last thing saved there (Lightning overwrites it): once this step is
            # committed, every other step at the path goes, whatever its number (a new run saving
            # last.ckpt at step 50 over an old run's step 1000 keeps step 50). Committed first,
            # then removed: a crash in between leaves both, and loading takes the one written last.
            try:
                store.supersede(manifest, reason=f"superseded: {path} was saved again (step {manifest.step})")
                store.prune(keep_last=1, protect={manifest.step})  # incomplete leftovers of older saves
            except Exception as e:  # noqa: BLE001 - clean-up failure must not fail training
                self.events.emit(Event.PRUNE_FAILED, step=manifest.step, path=path, error=str(e))

        self._writer.save(store, step, {_STATE_KEY: savable_hparams(checkpoint)}, metadata=metadata,
                          health=extra.get("health"), blocking=not self.async_save, replace=replace,
                          after_commit=keep_newest)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        with heartbeat.section(heartbeat.Section.RESTORE):
            return self._load_checkpoint(path)

    def _load_checkpoint(self, path: Any) -> dict[str, Any]:
        path = normalize_path(path)
        self.wait()
        group = self.group()
        if _is_url(path):  # served over http(s): that file, verified by every rank, or an error
            return self._load_agreed([Candidate(_step_in_name(path), path)], group, requested=path)

        def listing() -> tuple[PathKind, list[Candidate]]:
            kind = self._kind(path)
            if kind == PathKind.MISSING:
                return kind, []
            own = self._own_candidates(path, kind)
            if kind == PathKind.FILE and own is None:
                return kind, []  # a plain Lightning file: migrated below
            own = own or []
            if path != self._resolved or not own:
                return kind, own
            return kind, self._with_fallbacks(path, own)

        kind, candidates = on_rank0(group, listing, error=NoCheckpointError, what=f"cannot list checkpoints at {path}")
        if kind == PathKind.MISSING:
            # Lightning's own wording leads (its tests and users' scripts match on it), our detail after.
            raise CheckpointNotFoundError(f"Checkpoint file not found: {path} (no checkpoint at {path}: the path "
                                          "does not exist)")
        if kind == PathKind.FILE and not candidates:
            return self._migrate(path, group)
        if not candidates:
            raise NoCheckpointError(f"no committed checkpoint at {path}; was it written by ElasticCheckpointIO?")
        return self._load_agreed(candidates, group, requested=path)

    def _kind(self, path: str, storage_options: dict[str, Any] | None = None) -> PathKind:
        return path_kind(path, self._options(storage_options))

    def _file(self, path: str) -> tuple[Any, str]:
        """(storage of its directory, name) of a single file; a local link is followed here,
        once, so the file read is the one the link pointed to when the read began."""
        if "://" not in path and os.path.islink(path):
            path = os.path.realpath(path)
        parent, name = path.rsplit("/", 1)
        return open_storage(parent, self.storage_options), name

    def _own_candidates(self, path: str, kind: PathKind) -> list[Candidate] | None:
        """Rank 0: the checkpoints ``path`` itself holds, the one written last first. A file:
        its step as its record says (None: no record, a plain Lightning file; a damaged record:
        the step in its name, and loading it says what is wrong)."""
        if kind == PathKind.FILE:
            storage, name = self._file(path)
            try:
                record = single_file.record_of(storage, name)
            except CheckpointCorruptError:
                return [Candidate(_step_in_name(name), path)]
            return None if record is None else [Candidate(record.step, path)]
        store = self._store(path)
        own = store.committed_steps()
        if len(own) > 1:  # a crash between a re-save's commit and its clean-up: the last one written first
            own = [s for _, s in written_order(store.storage, [("", s) for s in own])]
        return [Candidate(s, path) for s in own]

    def _with_fallbacks(self, path: str, own: list[Candidate]) -> list[Candidate]:
        """Rank 0: ``own`` (what ``path``, from :meth:`resume_path`, holds), then every other
        checkpoint beside it up to its step, newest first. A step resumed from too often without
        anything newer being committed is skipped (``resume-attempts.json`` in the directory)."""
        dirpath = path.rsplit("/", 1)[0]
        candidates = own + [Candidate(s, p) for s, p in self.checkpoints(dirpath) if s <= own[0].step and p != path]
        kept, _dropped = self._store(dirpath).resume_candidates(
            sorted({c.step for c in candidates}, reverse=True), self.max_resumes_per_step)
        keep = set(kept)
        return [c for c in candidates if c.step in keep]

    def _migrate(self, path: str, group: Group) -> dict[str, Any]:
        """Collective: a plain ``.ckpt`` from before the plugin, loaded the way Lightning's
        default ``TorchCheckpointIO`` does (``torch.load(weights_only=True)``: tensors and plain
        containers only, no arbitrary objects unpickled). Said once; the next save is a bundle."""
        import io

        import torch

        checkpoint: Any = None
        why = None
        try:
            parent, name = path.rsplit("/", 1)
            data = open_storage(parent, self.storage_options).read(name).buffer
            assert data is not None
            checkpoint = torch.load(io.BytesIO(tensor_bytes(data)), map_location="cpu", weights_only=True)
            if not isinstance(checkpoint, dict):
                why = f"holds a {type(checkpoint).__name__}, not a Lightning checkpoint dict"
        except Exception as e:  # noqa: BLE001 - storage errors, and the weights-only unpickler's refusals
            # (pickle.UnpicklingError for an object it will not build): reported, never raised raw
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ok, _ = agree_on(group, not why)
        if not ok:
            self.events.emit(Event.CORRUPTION_FOUND, path=path, reason=why or "another rank could not load it")
            raise NoCheckpointError(
                f"plain checkpoint {path} (not written by ElasticCheckpointIO) could not be loaded by every rank "
                f"with torch.load(weights_only=True): {why or 'another rank could not load it'}"
            )
        self.events.emit(Event.CHECKPOINT_MIGRATED, path=path, step=checkpoint.get("global_step"))
        if group.rank == 0:
            log.warning("loading %s, a plain checkpoint written without ElasticCheckpointIO (torch.load with "
                        "weights_only=True, unverified); checkpoints saved from now on are verified bundles", path)
        return checkpoint

    def load_step(self, dirpath: str | os.PathLike[str], step: int) -> dict[str, Any]:
        """Collective: the checkpoint of exactly ``step`` under ``dirpath`` (any bundle holding
        it), verified and agreed by every rank. Used for rollbacks."""
        self.wait()
        group = self.group()
        candidates = on_rank0(group, lambda: [Candidate(s, p) for s, p in self.checkpoints(dirpath) if s == step],
                              error=NoCheckpointError, what=f"cannot list checkpoints under {normalize_path(dirpath)}")
        if not candidates:
            raise NoCheckpointError(f"no committed checkpoint of step {step} under {normalize_path(dirpath)}")
        assert candidates[0].path is not None
        return self._load_agreed(candidates, group, requested=candidates[0].path)

    def _load_agreed(self, candidates: list[Candidate], group: Group, *, requested: str) -> dict[str, Any]:
        agreed = agree(group, candidates, self._read, events=self.events, nothing=lambda details: (
            f"no checkpoint at {requested} could be verified and loaded by every rank: {details}. "
            "Inspect with 'elastic-resume verify PATH'."))
        checkpoint, chosen = agreed.value, agreed.candidate
        self.events.emit(Event.RESTORED, **chosen.fields(), skipped=[s.as_dict() for s in agreed.skipped],
                         tier="storage")
        if agreed.skipped:
            if group.rank == 0:
                log.warning("resuming from %s (step %d) instead of %s: %s", chosen.path, chosen.step, requested,
                            "; ".join(f"{s.candidate}: {s.reason}" for s in agreed.skipped))
            # For ElasticResume: Lightning's own "Restored all states from ..." then names the
            # checkpoint that was loaded, not the one that was asked for.
            checkpoint.setdefault(CHECKPOINT_KEY, {})["restored_from"] = {"path": chosen.path, "step": chosen.step,
                                                                          "requested": requested}
        return checkpoint

    def _read(self, candidate: Candidate) -> ReadAttempt[dict[str, Any]]:
        """The Lightning checkpoint dict of ``candidate`` as this rank reads it, verified."""
        assert candidate.path is not None
        if _is_url(candidate.path):
            return self._read_file(candidate.path)
        try:
            if self._kind(candidate.path) == PathKind.FILE:
                return self._read_file(candidate.path)
            store = self._store(candidate.path)
        except (ConfigError, StorageError) as e:
            return ReadAttempt(None, why=f"unreadable: {e}")
        attempt = try_read(store, candidate.step, rank=0, world_size=1, state={})
        loaded = attempt.value
        if loaded is None:
            return ReadAttempt(None, file=attempt.file, why=attempt.why)
        checkpoint = (loaded.replicated or {}).get(_STATE_KEY)
        if not isinstance(checkpoint, dict):
            return ReadAttempt(None, why="holds no Lightning checkpoint")
        return ReadAttempt(checkpoint, attempt.manifest_hash)

    def _read_file(self, path: str) -> ReadAttempt[dict[str, Any]]:
        rules = DecodeRules(self.allowed_classes)
        try:
            if _is_url(path):
                checkpoint, record = single_file.load_url(path, rules, self.collective_timeout_s)
                if record is None:  # a plain Lightning file on a web server: read as Lightning's default would
                    self.events.emit(Event.CHECKPOINT_MIGRATED, path=redact(path), step=checkpoint.get("global_step"))
                    return ReadAttempt(checkpoint, 1)
            else:
                storage, name = self._file(path)
                checkpoint, record = single_file.load_verified(storage, name, rules)
        except CheckpointCorruptError as e:  # the agreement reports it, naming the file
            return ReadAttempt(None, file=path.rsplit("/", 1)[-1], why=e.reason)
        except (StorageError, OSError) as e:
            return ReadAttempt(None, file=path.rsplit("/", 1)[-1], why=f"unreadable: {e}")
        if record is None:
            return ReadAttempt(None, file=path.rsplit("/", 1)[-1],
                               why="no integrity record (not written by ElasticCheckpointIO)")
        # Ranks compare this: every rank loaded the same file.
        return ReadAttempt(checkpoint, zlib.crc32(record.digest.encode()) + 1)

    def remove_checkpoint(self, path: Any) -> None:
        path = normalize_path(path)
        if path == self._active_path:
            self.wait()
        if "://" not in path and os.path.islink(path):  # save_last="link"
            os.unlink(path)
        elif self._kind(path) == PathKind.FILE:
            parent, name = path.rsplit("/", 1)
            open_storage(parent, self.storage_options).delete(name)
        else:
            storage = open_storage(path, self.storage_options)
            store = CheckpointStore(storage)
            for step in store.committed_steps():
                store.retire(step)  # manifests go first: never a half-deleted committed bundle
            storage.delete_tree("")
        self.events.emit(Event.CHECKPOINT_DELETED, path=path, reason="removed by Lightning")

    # -- background saves ------------------------------------------------------------------------
    def wait(self) -> None:
        """Wait for a background save; raise its error if it failed."""
        self._writer.wait()
        self._active_path = None

    def teardown(self) -> None:
        """End of ``fit``: the background save is finished and its thread released."""
        self._active_path = None
        self._writer.close()
        heartbeat.finished()
