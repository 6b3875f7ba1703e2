"""The checkpoint store: listing, reading, verifying, committing and retiring the steps under one
root. No collectives here: who calls what is decided by the writer, the reader and the agreement
(``saving.py``, ``reading.py``, ``agreement.py``); this module says what a committed checkpoint is
and checks it. Names on disk are in ``layout.py``, the commit marker in ``manifest.py``, what to
keep in ``retention.py``.

A step exists only once its MANIFEST.json exists and that manifest validates. "Loadable" has one
definition, :meth:`CheckpointStore.check_loadable`, used by restore (through the same readers),
``latest``, ``verify``, ``ls --full`` and retention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..contract import Event, StrEnum
from ..errors import (
    CheckpointCorruptError,
    CheckpointUnreadableError,
    CommitConflictError,
    ConfigError,
    FileTooLargeError,
    SizeMismatchError,
    StorageError,
)
from ..events import EventLog
from ..storage import Storage, digest_bytes
from . import crash_loop
from .layout import ATTEMPT_RE, MANIFEST_NAME, FileKind, manifest_path, parse_step_dir, step_dir
from .manifest import MAX_TENSORS, FileEntry, Manifest

if TYPE_CHECKING:  # torch is only needed to load, not to list or verify
    import torch

    from .format import Payload
    from .retention import RetentionPlan
    from .values import DecodeRules


class StepStatus(StrEnum):
    """What a step directory holds, as ``ls`` and ``verify`` report it."""

    COMMITTED = "committed"  #: its manifest validates and (full check) every file loads
    INCOMPLETE = "incomplete"  #: no manifest: never committed, invisible to resume
    CORRUPT = "corrupt"  #: committed, but something in it fails verification


def list_bundles(storage: Storage) -> dict[str, dict[int, bool]]:
    """The bundles directly under a directory (Lightning paths written by ElasticCheckpointIO,
    each a store root of its own: ``NAME/step-N/...``): ``{name: {step: committed}}``, from one
    recursive listing."""
    bundles: dict[str, dict[int, bool]] = {}
    for rel in storage.list_tree(""):
        parts = rel.split("/")
        if len(parts) >= 3 and (step := parse_step_dir(parts[1])) is not None:
            steps = bundles.setdefault(parts[0], {})
            steps[step] = steps.get(step, False) or (len(parts) == 3 and parts[2] == MANIFEST_NAME)
    return bundles


def written_order(storage: Storage, entries: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """``(prefix, step)`` pairs (``prefix``: a bundle name, or "" for the root itself), the one
    written last first: by the creation time its manifest records, then by step. This is what
    "the newest" means where a path holds "the last thing saved there" (a Lightning path, which
    a new run may save again at a lower step), as Lightning's own ``ckpt_path="last"`` picks the
    newest file by time. A manifest that cannot be read sorts last: loading it reports why."""
    def key(entry: tuple[str, int]) -> tuple[float, int]:
        prefix, step = entry
        rel = f"{prefix}/{manifest_path(step)}" if prefix else manifest_path(step)
        try:
            created = Manifest.parse(storage.read_small(rel), step=step, where=storage.display(rel)).created
        except (CheckpointCorruptError, OSError):
            created = float("-inf")
        return (created, step)

    return sorted(entries, key=key, reverse=True)


@dataclass
class StepListing:
    """What one listing saw of a step directory: its files (relative to it) and their sizes."""

    step: int
    files: dict[str, int]
    #: Why the directory could not be listed (permissions, I/O); such a step is neither
    #: "never committed" nor deletable: it is reported as unreadable and left alone.
    error: str | None = None

    @property
    def committed(self) -> bool:
        return MANIFEST_NAME in self.files or self.error is not None

    @property
    def size(self) -> int:
        return sum(self.files.values())


@dataclass
class StepReport:
    """Verification outcome of one step: ``problems`` maps a file (or the manifest) to why."""

    step: int
    status: StepStatus
    manifest: Manifest | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    size: int = 0
    #: For a single-file Lightning checkpoint (no manifest): its integrity record.
    record: Any = None

    @property
    def ok(self) -> bool:
        return self.status == StepStatus.COMMITTED


@dataclass
class StatePart:
    """One decoded data file: the tree's skeleton (only in the file that carries it) and the
    tensors this file holds, by their index in the saved tensor list."""

    skeleton: Any
    tensors: dict[int, Any]


class CheckpointStore:
    """Reads and writes steps through a Storage backend. Safe to use from any rank; it performs
    no collectives. Every verification failure is reported as an event naming step and file.

    "Loadable" has one definition, :meth:`check_loadable`, used by restore (through the same
    readers), ``latest``, ``verify``, ``ls --full`` and ``prune``: the manifest validates, every
    file has its recorded size and digest, every data file decodes under bounds, and the pieces
    fit together into one state."""

    def __init__(self, storage: Storage, *, events: EventLog | None = None,
                 allowed_classes: frozenset[str] = frozenset()) -> None:
        self.storage = storage
        self.events = events or EventLog()
        #: The user's classes (``module:qualname``) that decoding may rebuild; see ``values``.
        self.allowed_classes = allowed_classes
        # step -> raw digest of a manifest this process found (or made) loadable: a step whose
        # manifest is unchanged and whose files still have their sizes is not read again.
        self._known_loadable: dict[int, str] = {}
        # step -> (raw manifest digest, problems) of a step found unloadable: judged once, not
        # read in full again at every prune while it stands unchanged.
        self._known_unloadable: dict[int, tuple[str, list[tuple[str, str]]]] = {}
        #: Told ``(manifest, entry)`` after each data file of a step this process loads has been
        #: read and verified (or received from the rank that read it): a restore's progress bar.
        self.on_loaded: Callable[[Manifest, FileEntry], None] | None = None

    def loaded(self, manifest: Manifest, entry: FileEntry) -> None:
        if self.on_loaded is not None:
            self.on_loaded(manifest, entry)

    # -- listing -----------------------------------------------------------------------------
    def scan(self) -> dict[int, StepListing]:
        """Every step directory with its files and sizes, from one recursive listing (plus one
        shallow listing, so that empty directories of a save that just began show up too). On
        S3 this is a handful of LIST requests however many steps exist, not a HEAD per step."""
        steps: dict[int, StepListing] = {}
        names = self.storage.list_dirs()
        try:
            tree = self.storage.list_tree("")
        except StorageError:
            tree = self._scan_each(names, steps)
        for rel, size in tree.items():
            head, sep, rest = rel.partition("/")
            step = parse_step_dir(head)
            if step is not None and sep:
                steps.setdefault(step, StepListing(step, {})).files[rest] = size
        for name in names:
            step = parse_step_dir(name)
            if step is not None:
                steps.setdefault(step, StepListing(step, {}))
        return steps

    def _scan_each(self, names: list[str], steps: dict[int, StepListing]) -> dict[str, int]:
        """The slow path of :meth:`scan` when some directory cannot be listed: one listing per
        step, so the failing steps are known by name (and kept out of every decision)."""
        tree: dict[str, int] = {}
        for name in names:
            step = parse_step_dir(name)
            if step is None:
                continue
            try:
                tree.update({f"{name}/{rel}": size for rel, size in self.storage.list_tree(name).items()})
            except StorageError as e:
                steps[step] = StepListing(step, {}, error=str(e))
        return tree

    def step_dirs(self) -> list[int]:
        """Every step directory, oldest first."""
        return sorted(self.scan())

    def has_manifest(self, step: int) -> bool:
        return self.storage.exists(f"{step_dir(step)}/{MANIFEST_NAME}")

    def committed_steps(self) -> list[int]:
        """Steps whose manifest exists (validity not yet checked), newest first."""
        listing = self.scan()
        return [s for s in sorted(listing, reverse=True) if listing[s].committed]

    # -- crash-loop memory -------------------------------------------------------------------
    def resume_candidates(self, committed: list[int], max_resumes: int) -> tuple[list[int], dict[int, str]]:
        """Newest-first steps a resume should try, minus crash-looping ones, counting this resume
        (see :func:`crash_loop.resume_candidates`). Only the process that decides calls it."""
        return crash_loop.resume_candidates(self, committed, max_resumes)

    # -- manifest ----------------------------------------------------------------------------
    def manifest_path(self, step: int) -> str:
        return manifest_path(step)

    def _manifest_bytes(self, step: int) -> bytes:
        rel = self.manifest_path(step)
        where = self.storage.display(rel)
        try:
            return self.storage.read_small(rel)
        except FileNotFoundError:
            raise CheckpointCorruptError(step, where, "no manifest: the step was never committed") from None
        except FileTooLargeError as e:
            raise CheckpointCorruptError(step, where, e.strerror or str(e)) from None
        except OSError as e:  # StorageError included: permission, I/O, network
            raise CheckpointUnreadableError(step, where, f"unreadable: {e}") from None

    def read_manifest(self, step: int) -> Manifest:
        data = self._manifest_bytes(step)
        return Manifest.parse(data, step=step, where=self.storage.display(self.manifest_path(step)))

    def manifest_digest(self, step: int) -> str | None:
        """Digest of the manifest file's bytes as they are now (valid or not), None if absent
        or unreadable."""
        try:
            return digest_bytes(self._manifest_bytes(step))
        except CheckpointCorruptError:
            return None

    # -- writing -----------------------------------------------------------------------------
    def prepare(self, step: int, attempt: str) -> None:
        if not ATTEMPT_RE.match(attempt):
            raise ConfigError(f"invalid attempt id {attempt!r}")
        self.storage.makedirs(f"{step_dir(step)}/{attempt}")

    def write_file(self, step: int, rel_in_step: str, encoded: Payload, *, rank: int | None) -> FileEntry:
        result = self.storage.write_atomic(f"{step_dir(step)}/{rel_in_step}", encoded.chunks(), size=encoded.size)
        if result.size != encoded.size:
            raise StorageError(0, f"wrote {result.size} bytes to {rel_in_step} but expected {encoded.size}")
        return FileEntry(rel_in_step, result.size, result.digest, rank)

    def commit(self, manifest: Manifest, *, replace: str | None = None) -> None:
        """Make the step visible: the create-only write of the manifest is the commit point.

        ``replace`` is the digest of a committed manifest of this step that the caller proved
        it must not use (corrupt for some rank, dropped by the crash-loop fallback, or the
        rollback anchor it re-commits). The old manifest is then swapped for the new one only
        while it still holds exactly those bytes (compare-and-swap in the backend), so a
        replacement that someone else committed meanwhile is never overwritten; the old
        attempt's data is removed after the swap. Without ``replace`` an existing manifest is
        a CommitConflictError and stays untouched."""
        rel = self.manifest_path(manifest.step)
        data = manifest.to_bytes()
        try:
            if replace is None:
                self.storage.write_create_only(rel, data)
            else:
                self.storage.replace_if(rel, data, replace)
        except FileExistsError:
            if replace is None:
                raise CommitConflictError(
                    f"step {manifest.step} is already committed at {self.storage.display(rel)}; "
                    "refusing to overwrite it (a second writer, or a resumed run saving a step it "
                    "already has). The existing checkpoint is untouched."
                ) from None
            raise CommitConflictError(
                f"step {manifest.step} at {self.storage.display(rel)} was committed again by another run "
                "after this run found it unusable; refusing to replace that commit (this process is "
                "probably a stale incarnation of the job). The existing checkpoint is untouched."
            ) from None
        self._known_loadable[manifest.step] = manifest.raw_digest
        if replace is not None:
            self._remove_stale_attempts(manifest.step, keep_attempt=manifest.attempt)
            crash_loop.forget(self, manifest.step)

    def _remove_stale_attempts(self, step: int, *, keep_attempt: str) -> None:
        """After a replacement: attempt directories the new manifest does not point to."""
        try:
            stale = {rel.split("/", 1)[0] for rel in self.storage.list_tree(step_dir(step)) if "/" in rel}
            for attempt in sorted(stale - {keep_attempt}):
                if ATTEMPT_RE.match(attempt):
                    self.storage.delete_tree(f"{step_dir(step)}/{attempt}")
        except (StorageError, OSError) as e:  # clean-up: the commit already stands
            self.events.emit(Event.PRUNE_FAILED, step=step, error=f"could not remove replaced data: {e}")

    def retire(self, step: int) -> None:
        """Make a committed step invisible (manifest first, so no half-deleted step ever looks
        committed), then delete its files."""
        self._known_loadable.pop(step, None)
        self._known_unloadable.pop(step, None)
        self.storage.delete(self.manifest_path(step))
        self.storage.delete_tree(step_dir(step))

    def why_not_standing(self, manifest: Manifest) -> str | None:
        """None when the step ``manifest`` committed still stands as this process committed it
        (the same manifest bytes, every file with its size; its bytes were digested as they
        were written): the proof a deletion of *other* steps holds at the moment it deletes.
        Otherwise what is wrong."""
        report = self.check_loadable(manifest.step)
        if report.ok and report.manifest is not None and report.manifest.raw_digest == manifest.raw_digest:
            return None
        return "; ".join(f"{f}: {r}" for f, r in report.problems) or "its manifest changed since the commit"

    def supersede(self, manifest: Manifest, *, reason: str) -> list[int]:
        """After ``manifest`` was committed at a root that means "the last thing saved here" (a
        Lightning path): retire every other committed step, whatever its number. The proof that
        this removes nothing that is the only loadable state is taken now, before the first
        deletion: the step just committed still stands with the manifest this process wrote
        (the same bytes) and its files (this process wrote and digested them) have their sizes."""
        if (why := self.why_not_standing(manifest)) is not None:
            self.events.emit(Event.PRUNE_FAILED, step=manifest.step,
                             error=f"older steps kept: the step just committed does not verify ({why})")
            return []
        retired = [s for s in self.committed_steps() if s != manifest.step]
        for step in retired:
            self.retire(step)
            self.events.emit(Event.CHECKPOINT_DELETED, step=step, reason=reason)
        return retired

    # -- reading -----------------------------------------------------------------------------
    def _where(self, manifest: Manifest, entry: FileEntry) -> str:
        return self.storage.display(f"{step_dir(manifest.step)}/{entry.path}")

    @contextlib.contextmanager
    def _reading(self, manifest: Manifest, where: str) -> Iterator[None]:
        """A data file that is missing or has the wrong size is corrupt; one that cannot be read
        (permission, I/O) is unreadable: either way not loadable, and named."""
        try:
            yield
        except FileNotFoundError:
            raise CheckpointCorruptError(manifest.step, where, "listed in the manifest but missing") from None
        except SizeMismatchError as e:
            raise CheckpointCorruptError(manifest.step, where, e.strerror or str(e)) from None
        except OSError as e:
            raise CheckpointUnreadableError(manifest.step, where, f"unreadable: {e}") from None

    def read_file(self, manifest: Manifest, entry: FileEntry, *, keep: bool = True) -> torch.Tensor | None:
        """Read one data file, checking size and digest in the same pass; corruption raises
        CheckpointCorruptError naming the file. ``keep=False`` verifies without holding bytes."""
        rel = f"{step_dir(manifest.step)}/{entry.path}"
        where = self.storage.display(rel)
        with self._reading(manifest, where):
            result = self.storage.read(rel, expected_size=entry.size, keep=keep)
        if result.digest != entry.digest:
            raise CheckpointCorruptError(
                manifest.step, where, f"digest mismatch (recorded {entry.digest}, read {result.digest})"
            )
        if keep:
            self.loaded(manifest, entry)
        return result.buffer

    def read_tree(self, manifest: Manifest, entry: FileEntry, *, materialize: bool = True) -> Any:
        """Read and decode one data file in a single pass, each tensor into storage of its
        own (``materialize=False``: shape-only tensors, for verification). When decoding fails
        the rest is still read, so a damaged file is reported by its digest (the root cause)
        and an intact but unreadable one by what is wrong with it."""
        from .format import decode_stream

        rel = f"{step_dir(manifest.step)}/{entry.path}"
        where = self.storage.display(rel)
        with self._reading(manifest, where), self.storage.open_stream(rel, expected_size=entry.size) as stream:
            try:
                tree, problem = decode_stream(stream, where=where, materialize=materialize), None
            except CheckpointCorruptError as e:
                tree, problem = None, e
            digest = stream.finish()
        if digest != entry.digest:
            raise CheckpointCorruptError(
                manifest.step, where, f"digest mismatch (recorded {entry.digest}, read {digest})"
            )
        if problem is not None:
            raise type(problem)(manifest.step, where, problem.reason)
        if materialize:
            self.loaded(manifest, entry)
        return tree

    def read_part(self, manifest: Manifest, entry: FileEntry, *, materialize: bool = True) -> StatePart:
        """One data file as a :class:`StatePart`, its structure checked."""
        return self.as_part(manifest, entry, self.read_tree(manifest, entry, materialize=materialize))

    def as_part(self, manifest: Manifest, entry: FileEntry, part: Any) -> StatePart:
        """A decoded data file's tree as a :class:`StatePart` (untrusted: its structure checked)."""
        where = self._where(manifest, entry)
        if not isinstance(part, dict) or not isinstance(part.get("tensors"), dict):
            raise CheckpointCorruptError(manifest.step, where, "data file does not hold a state")
        tensors = part["tensors"]
        if not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < MAX_TENSORS for k in tensors):
            raise CheckpointCorruptError(manifest.step, where, "data file has an invalid tensor index")
        return StatePart(part.get("skeleton"), tensors)

    def decode_part(self, manifest: Manifest, entry: FileEntry, buffer: torch.Tensor) -> StatePart:
        """A data file already in memory (its digest checked by whoever read it) as a
        :class:`StatePart`; its tensors are views of ``buffer``."""
        from .format import decode

        where = self._where(manifest, entry)
        try:
            tree = decode(buffer, where=where, rules=self.decode_rules())
        except CheckpointCorruptError as e:
            raise CheckpointCorruptError(manifest.step, where, e.reason) from None
        return self.as_part(manifest, entry, tree)

    def read_replicated(self, manifest: Manifest, *, materialize: bool = True) -> tuple[Any, list[Any]]:
        """The replicated state's skeleton and its tensors in order, from every ``shared`` file
        (this process reads them all; ``parallel_read`` spreads them over the ranks)."""
        entries = manifest.files_of(FileKind.SHARED)
        return self.assemble_replicated(
            manifest, [(e, self.read_part(manifest, e, materialize=materialize)) for e in entries])

    def assemble_replicated(self, manifest: Manifest, parts: list[tuple[FileEntry, StatePart]]) -> tuple[Any, list[Any]]:
        """The skeleton and tensors in order from the shared files' parts; the pieces must add
        up to exactly the count the manifest records."""
        skeleton, tensors = None, {}
        for entry, part in parts:
            if part.skeleton is not None:
                skeleton = part.skeleton
            for k, t in part.tensors.items():
                if k in tensors:
                    raise CheckpointCorruptError(manifest.step, self._where(manifest, entry), f"tensor {k} is held twice")
                tensors[k] = t
        expected = manifest.extra.get("replicated_tensors", len(tensors))
        # Bounded by MAX_TENSORS at parse time; compare counts before building anything of
        # that length.
        if skeleton is None or len(tensors) != expected or any(not 0 <= k < expected for k in tensors):
            raise CheckpointCorruptError(
                manifest.step, None, f"shared files hold {len(tensors)} of {expected} replicated tensors"
                + ("" if skeleton is not None else " and no state structure")
            )
        return skeleton, [tensors[i] for i in range(expected)]

    def per_rank_entry(self, manifest: Manifest, rank: int) -> FileEntry | None:
        """The file holding ``rank``'s per-rank state, or None when the step has none."""
        if not manifest.extra.get("per_rank_keys"):
            return None
        own = manifest.files_of(FileKind.RANK, rank)
        if not own:
            raise CheckpointCorruptError(manifest.step, None, f"no per-rank file for rank {rank}")
        return own[0]

    def read_per_rank(self, manifest: Manifest, rank: int, *, materialize: bool = True) -> Any:
        """The per-rank state saved by ``rank`` as a tree, or None when the step has none."""
        entry = self.per_rank_entry(manifest, rank)
        if entry is None:
            return None
        return self.per_rank_tree(manifest, entry, self.read_part(manifest, entry, materialize=materialize),
                                  materialize=materialize)

    def per_rank_tree(self, manifest: Manifest, entry: FileEntry, part: StatePart, *, materialize: bool = True) -> Any:
        """A per-rank file's part as its tree (its tensors must be numbered 0..n-1)."""
        from .format import unflatten

        count = len(part.tensors)
        if sorted(part.tensors) != list(range(count)):
            raise CheckpointCorruptError(manifest.step, self._where(manifest, entry), "per-rank tensors are not numbered 0..n-1")
        return unflatten(part.skeleton, [part.tensors[i] for i in range(count)], where=self._where(manifest, entry),
                         rules=self.decode_rules(materialize))

    def decode_rules(self, materialize: bool = True) -> DecodeRules:
        """How values are rebuilt: the user's classes; quiet while only verifying."""
        from .values import DecodeRules

        return DecodeRules(self.allowed_classes, warn=materialize)

    # -- verification ------------------------------------------------------------------------
    def verify(self, step: int, *, full: bool = True, listing: StepListing | None = None) -> StepReport:
        """Quick: the manifest validates and every file is present with its size. Full: the one
        definition of loadable (see :meth:`check_loadable`). ``listing`` reuses a scan."""
        return self.check_loadable(step, listing=listing) if full else self._quick(step, listing)

    def _quick(self, step: int, listing: StepListing | None) -> StepReport:
        if listing is None:
            try:
                listing = StepListing(step, self.storage.list_tree(step_dir(step)))
            except OSError as e:
                return StepReport(step, StepStatus.CORRUPT, problems=[(self.storage.display(step_dir(step)), f"unreadable: {e}")])
        if listing.error is not None:
            where = self.storage.display(step_dir(step))
            return StepReport(step, StepStatus.CORRUPT, problems=[(where, f"unreadable: {listing.error}")])
        if not listing.committed:
            return StepReport(step, StepStatus.INCOMPLETE, size=listing.size)
        try:
            manifest = self.read_manifest(step)
        except CheckpointCorruptError as e:
            return StepReport(step, StepStatus.CORRUPT, problems=[(e.file or MANIFEST_NAME, e.reason)])
        report = StepReport(step, StepStatus.COMMITTED, manifest=manifest, size=manifest.total_bytes)
        for entry in manifest.files:
            where = self.storage.display(f"{step_dir(step)}/{entry.path}")
            have = listing.files.get(entry.path)
            if have is None:
                report.problems.append((where, "listed in the manifest but missing"))
            elif have != entry.size:
                report.problems.append((where, f"size {have} bytes, manifest records {entry.size}"))
        if report.problems:
            report.status = StepStatus.CORRUPT
        return report

    def check_loadable(self, step: int, *, listing: StepListing | None = None) -> StepReport:
        """Full verification: quick checks, then every byte against its digest, every data file
        decoded under bounds (without keeping tensors) and the pieces assembled: the replicated
        skeleton with its tensors, every rank's per-rank state, the sharded index. What passes
        here is what restore loads; what fails is what restore skips."""
        report = self._quick(step, listing)
        if not report.ok:
            return report
        manifest = report.manifest
        assert manifest is not None
        if self._known_loadable.get(step) == manifest.raw_digest:
            return report
        bad = self._known_unloadable.get(step)
        if bad is not None and bad[0] == manifest.raw_digest:
            report.status, report.problems = StepStatus.CORRUPT, list(bad[1])
            return report
        try:
            self._check_pieces(manifest)
        except CheckpointCorruptError as e:
            report.status = StepStatus.CORRUPT
            report.problems.append((e.file or self.storage.display(step_dir(step)), e.reason))
            self._known_unloadable[step] = (manifest.raw_digest, list(report.problems))
            return report
        self._known_loadable[step] = manifest.raw_digest
        return report

    def known_unloadable(self, step: int) -> bool:
        """Whether this process already judged ``step`` unloadable (and reported it)."""
        return step in self._known_unloadable

    def _check_pieces(self, manifest: Manifest) -> None:
        from .format import unflatten

        skeleton, tensors = self.read_replicated(manifest, materialize=False)
        # Sharded leaves stand in as placeholders named by the sharded index, so the skeleton
        # is checked by the same decoder restore uses.
        placeholders: dict[str, Any] = {}
        for entry in manifest.files_of(FileKind.DCP):
            self.read_part(manifest, entry, materialize=False)
        for entry in manifest.files_of(FileKind.DCP_META):
            from .sharded import parse_metadata

            buf = self.read_file(manifest, entry)
            assert buf is not None
            meta = parse_metadata(bytes(buf.numpy().tobytes()), step=manifest.step, where=self._where(manifest, entry))
            placeholders.update({fqn: None for fqn in meta.state_dict_metadata})
        unflatten(skeleton, tensors, where=self.storage.display(step_dir(manifest.step)), sharded=placeholders,
                  rules=self.decode_rules(materialize=False))
        for rank in sorted({f.rank for f in manifest.files_of(FileKind.RANK) if f.rank is not None}):
            self.read_per_rank(manifest, rank, materialize=False)

    def verify_all(self, *, full: bool, progress: Callable[[int, int], None] | None = None) -> list[StepReport]:
        """Reports for every step directory, newest first, from one scan. ``progress(done, total)``
        (bytes, by whole steps) after the scan and after each step."""
        listing = self.scan()
        steps = sorted(listing, reverse=True)
        total, done = sum(listing[s].size for s in steps), 0
        reports = []
        if progress is not None:
            progress(0, total)
        for s in steps:
            reports.append(self.verify(s, full=full, listing=listing[s]))
            done += listing[s].size
            if progress is not None:
                progress(done, total)
        return reports

    def report_corruption(self, step: int, file: str | None, reason: str, **fields: Any) -> None:
        self.events.emit(Event.CORRUPTION_FOUND, step=step, file=file, reason=reason, **fields)

    def mark_loadable(self, step: int, raw_digest: str) -> None:
        """Record that this process loaded ``step`` in full from a manifest with this digest."""
        self._known_loadable[step] = raw_digest

    def latest(self, *, full: bool = True) -> int | None:
        """The newest step that verifies; bad steps on the way are reported and skipped."""
        listing = self.scan()
        for step in sorted((s for s in listing if listing[s].committed), reverse=True):
            report = self.verify(step, full=full, listing=listing[step])
            if report.ok:
                return step
            for file, reason in report.problems:
                self.report_corruption(step, file, reason)
        return None

    # -- retention ---------------------------------------------------------------------------
    def prune(self, *, keep_last: int | None, keep_every: int | None = None, protect: Iterable[int] = (),
              in_flight: int | None = None, dry_run: bool = False, lock_timeout: float = 60.0,
              progress: Callable[[str, int, int], None] | None = None) -> RetentionPlan:
        """Apply retention under the prune lock (see :func:`retention.prune`)."""
        from .retention import prune

        return prune(self, keep_last=keep_last, keep_every=keep_every, protect=protect, in_flight=in_flight,
                     dry_run=dry_run, lock_timeout=lock_timeout, progress=progress)
