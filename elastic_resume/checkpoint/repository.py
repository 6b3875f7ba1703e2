"""The step repository: the steps under one root as storage sees them. It lists them, reads and
commits their manifests, writes their files as bytes and retires them, and knows nothing of what
the bytes mean: decoding and verification sit above it (``verified_reader.py``), retention and the
crash-loop memory above that (``store.py``). No collectives here.

A step exists only once its MANIFEST.json exists (create-only: the commit point) and that manifest
validates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..contract import Event
from ..errors import (
    CheckpointCorruptError,
    CheckpointUnreadableError,
    CommitConflictError,
    ConfigError,
    FileTooLargeError,
    StorageError,
)
from ..events import EventLog
from ..storage import Storage, digest_bytes
from .layout import ATTEMPT_RE, MANIFEST_NAME, manifest_path, parse_step_dir, step_dir
from .manifest import FileEntry, Manifest

if TYPE_CHECKING:
    from .format import Payload


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


class StepRepository:
    """The steps under one root, through a Storage backend: listing, manifests, commit, retire.
    Safe to use from any rank; it performs no collectives."""

    def __init__(self, storage: Storage, *, events: EventLog | None = None) -> None:
        self.storage = storage
        self.events = events or EventLog()

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
        self._committed(manifest)
        if replace is not None:
            self._remove_stale_attempts(manifest.step, keep_attempt=manifest.attempt)
            self._replaced(manifest.step)

    def _committed(self, manifest: Manifest) -> None:
        """Told after this process committed ``manifest`` (what sits above keeps its judgements)."""

    def _replaced(self, step: int) -> None:
        """Told after a commit replaced an earlier commit of ``step``."""

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
        self._forget(step)
        self.storage.delete(self.manifest_path(step))
        self.storage.delete_tree(step_dir(step))

    def _forget(self, step: int) -> None:
        """Told before ``step`` is retired."""

    def report_corruption(self, step: int, file: str | None, reason: str, **fields: object) -> None:
        self.events.emit(Event.CORRUPTION_FOUND, step=step, file=file, reason=reason, **fields)
