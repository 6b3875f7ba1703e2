"""The verified reader: a step's files decoded under bounds and checked against the digests of the
manifest that commits them, and the one definition of "loadable" (:meth:`StepReader.check_loadable`),
used by restore (through the same readers), ``latest``, ``verify``, ``ls --full`` and retention.

Bytes come from storage here (:meth:`StepReader.read_file`, size and digest checked in the same
pass); the memory tier (``memory_tier.py``) and the ranks' exchange (``parallel_read.py``) hand
the same decoders bytes they hold, checked against the same digests. Which step every rank loads
is decided in ``agreement.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..contract import StrEnum
from ..errors import CheckpointCorruptError, CheckpointUnreadableError, SizeMismatchError
from ..events import EventLog
from ..storage import Storage
from .layout import MANIFEST_NAME, FileKind, step_dir
from .manifest import MAX_TENSORS, FileEntry, Manifest
from .repository import StepListing, StepRepository

if TYPE_CHECKING:  # torch is only needed to load, not to list or verify
    import torch

    from .values import DecodeRules


class StepStatus(StrEnum):
    """What a step directory holds, as ``ls`` and ``verify`` report it."""

    COMMITTED = "committed"  #: its manifest validates and (full check) every file loads
    INCOMPLETE = "incomplete"  #: no manifest: never committed, invisible to resume
    CORRUPT = "corrupt"  #: committed, but something in it fails verification


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


class StepReader(StepRepository):
    """The repository's steps, read and verified. Every verification failure is reported as an
    event naming step and file.

    "Loadable": the manifest validates, every file has its recorded size and digest, every data
    file decodes under bounds, and the pieces fit together into one state."""

    def __init__(self, storage: Storage, *, events: EventLog | None = None,
                 allowed_classes: frozenset[str] = frozenset()) -> None:
        super().__init__(storage, events=events)
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

    def _committed(self, manifest: Manifest) -> None:
        self._known_loadable[manifest.step] = manifest.raw_digest  # its bytes were digested as written

    def _forget(self, step: int) -> None:
        self._known_loadable.pop(step, None)
        self._known_unloadable.pop(step, None)

    # -- reading -----------------------------------------------------------------------------
    def file_where(self, manifest: Manifest, entry: FileEntry) -> str:
        """How messages and events name a data file of a step (its storage location)."""
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
        where = self.file_where(manifest, entry)
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

        where = self.file_where(manifest, entry)
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
                    raise CheckpointCorruptError(manifest.step, self.file_where(manifest, entry), f"tensor {k} is held twice")
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

        count, where = len(part.tensors), self.file_where(manifest, entry)
        if sorted(part.tensors) != list(range(count)):
            raise CheckpointCorruptError(manifest.step, where, "per-rank tensors are not numbered 0..n-1")
        return unflatten(part.skeleton, [part.tensors[i] for i in range(count)], where=where,
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
            meta = parse_metadata(bytes(buf.numpy().tobytes()), step=manifest.step, where=self.file_where(manifest, entry))
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
