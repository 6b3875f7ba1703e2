"""The checkpoint store: step layout, the manifest (the one commit marker), verification and
retention. No collectives here: the manager decides who calls what; this module says what a
committed checkpoint is and checks it.

Layout under a root::

    step-000000001200/MANIFEST.json          written last, create-only: the commit
    step-000000001200/<attempt>/rank-00000.ert   data files, each listed in the manifest

A step exists only once its MANIFEST.json exists and that manifest validates. Data files live
under an attempt id agreed by all ranks of one save, so a zombie writer of an older attempt can
never overwrite what a committed manifest points to.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import CheckpointCorruptError, CommitConflictError, ConfigError, StorageError
from .events import EventLog, jsonable
from .storage import DIGEST_ALGO, SizeMismatchError, Storage, digest_bytes

if TYPE_CHECKING:  # torch is only needed to load, not to list or verify
    import torch

    from .serialization import EncodedFile

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "elastic-resume-manifest"
MANIFEST_VERSION = 1
STEP_PREFIX = "step-"
#: Root-level file counting resumes per step, for the crash-loop fallback.
RESUME_LOG = "resume-attempts.json"
STEP_DIGITS = 12
PRUNE_LOCK = ".prune.lock"

_STEP_RE = re.compile(r"^step-(\d{%d,})$" % STEP_DIGITS)
_SAFE_COMPONENT = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_SAFE_REL_RE = re.compile(rf"^{_SAFE_COMPONENT}(/{_SAFE_COMPONENT})*$")
_ATTEMPT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def step_dir(step: int) -> str:
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step_dir(name: str) -> int | None:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def new_attempt_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:10]


def data_file(attempt: str, rank: int, kind: str = "rank") -> str:
    return f"{attempt}/{kind}-{rank:05d}.ert"


def is_safe_relative_path(path: Any) -> bool:
    """True for 'a/b.c'-style paths that stay inside their step directory: no '..', no leading
    '/', no scheme or other bucket, no empty or '.'-only components."""
    return isinstance(path, str) and len(path) < 1024 and bool(_SAFE_REL_RE.match(path))


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


FILE_KINDS = ("rank", "shared", "dcp", "dcp-meta")


@dataclass(frozen=True)
class FileEntry:
    """One data file of a step. ``kind`` says who needs it: ``rank`` files hold one rank's own
    state (read by that rank), ``shared`` files hold a slice of the replicated state (read by
    every rank), ``dcp`` files hold sharded (DTensor) state and ``dcp-meta`` its index (read
    as torch.distributed.checkpoint's load plan says)."""

    path: str
    size: int
    digest: str
    rank: int | None = None
    kind: str = "rank"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "digest": self.digest, "rank": self.rank, "kind": self.kind}


@dataclass
class Manifest:
    """What a committed step holds. ``checksum`` covers the canonical JSON of everything else."""

    step: int
    attempt: str
    world_size: int
    files: list[FileEntry]
    created: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    checksum: str = ""

    def body(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "step": self.step,
            "attempt": self.attempt,
            "world_size": self.world_size,
            "created": self.created,
            "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "files": [f.to_json() for f in self.files],
            "metadata": jsonable(self.metadata),
            "fingerprint": self.fingerprint,
            "health": self.health,
            "extra": self.extra,
        }

    def to_bytes(self) -> bytes:
        body = self.body()
        self.checksum = digest_bytes(canonical_json(body))
        body["checksum"] = self.checksum
        return json.dumps(body, sort_keys=True, indent=1).encode() + b"\n"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def files_of(self, kind: str, rank: int | None = None) -> list[FileEntry]:
        return [f for f in self.files if f.kind == kind and (rank is None or f.rank == rank)]

    @classmethod
    def parse(cls, data: bytes, *, step: int, where: str) -> "Manifest":
        """Validate and parse a manifest; every problem is a CheckpointCorruptError naming it."""

        def bad(reason: str) -> CheckpointCorruptError:
            return CheckpointCorruptError(step, where, reason)

        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"manifest is not valid JSON ({e.msg} at byte {e.pos})" if isinstance(e, json.JSONDecodeError) else "manifest is not UTF-8") from None
        if not isinstance(doc, dict):
            raise bad("manifest is not a JSON object")
        if doc.get("format") != MANIFEST_FORMAT:
            raise bad(f"not an elastic-resume manifest (format={doc.get('format')!r})")
        version = doc.get("version")
        if version != MANIFEST_VERSION:
            raise bad(
                f"unknown manifest version {version!r}; this elastic-resume reads version "
                f"{MANIFEST_VERSION} (a newer release may have written it: upgrade to read it)"
            )
        checksum = doc.pop("checksum", None)
        if not isinstance(checksum, str) or digest_bytes(canonical_json(doc)) != checksum:
            raise bad("manifest checksum does not match its contents (edited or damaged)")
        if doc.get("step") != step:
            raise bad(f"manifest says step {doc.get('step')!r} but lies in the directory of step {step}")
        attempt = doc.get("attempt")
        if not isinstance(attempt, str) or not _ATTEMPT_RE.match(attempt):
            raise bad(f"invalid attempt id {attempt!r}")
        world_size = doc.get("world_size")
        if not isinstance(world_size, int) or world_size < 1:
            raise bad(f"invalid world size {world_size!r}")
        files_doc = doc.get("files")
        if not isinstance(files_doc, list) or not files_doc:
            raise bad("manifest lists no files")
        files = []
        for i, f in enumerate(files_doc):
            if not isinstance(f, dict):
                raise bad(f"file entry {i} is not an object")
            path = f.get("path")
            if not is_safe_relative_path(path) or not path.startswith(attempt + "/"):
                raise bad(
                    f"file entry {i} has unsafe path {path!r}: files must lie under "
                    f"'{attempt}/' inside the step (no '..', absolute paths or other buckets)"
                )
            size, digest, rank, kind = f.get("size"), f.get("digest"), f.get("rank"), f.get("kind", "rank")
            if kind not in FILE_KINDS:
                raise bad(f"file {path} has unknown kind {kind!r}")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad(f"file {path} has invalid size {size!r}")
            if not isinstance(digest, str) or not digest.startswith(DIGEST_ALGO + ":"):
                raise bad(f"file {path} has unsupported digest {digest!r}")
            if rank is not None and (not isinstance(rank, int) or rank < 0):
                raise bad(f"file {path} has invalid rank {rank!r}")
            files.append(FileEntry(path, size, digest, rank, kind))
        if len({f.path for f in files}) != len(files):
            raise bad("manifest lists a file twice")
        created = doc.get("created")
        return cls(
            step=step,
            attempt=attempt,
            world_size=world_size,
            files=files,
            created=float(created) if isinstance(created, (int, float)) else 0.0,
            metadata=doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {},
            fingerprint=doc.get("fingerprint") if isinstance(doc.get("fingerprint"), dict) else {},
            health=doc.get("health") if isinstance(doc.get("health"), dict) else {},
            extra=doc.get("extra") if isinstance(doc.get("extra"), dict) else {},
            checksum=checksum,
        )


@dataclass
class StepListing:
    """What one listing saw of a step directory: its files (relative to it) and their sizes."""

    step: int
    files: dict[str, int]

    @property
    def committed(self) -> bool:
        return MANIFEST_NAME in self.files

    @property
    def size(self) -> int:
        return sum(self.files.values())


@dataclass
class StepReport:
    """Verification outcome of one step: ``problems`` maps a file (or the manifest) to why."""

    step: int
    status: str  # committed | incomplete | corrupt
    manifest: Manifest | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "committed"


@dataclass(frozen=True)
class RetentionPlan:
    delete: list[int]
    keep: dict[int, str]  # step -> why it is kept
    delete_incomplete: list[int]


def plan_retention(
    committed: Sequence[int],
    incomplete: Sequence[int],
    *,
    keep_last: int | None,
    keep_every: int | None = None,
    newest_verified: int | None = None,
    protect: Iterable[int] = (),
    in_flight: int | None = None,
) -> RetentionPlan:
    """Pure retention decision. Two rules no configuration can break: the newest verified step
    and every protected step (the rollback anchor) are kept. Incomplete directories are deleted
    only when older than the newest commit (so not a save in flight) and not ``in_flight``."""
    if keep_last is not None and keep_last < 1:
        raise ConfigError(f"keep_last must be at least 1 (got {keep_last})")
    if keep_every is not None and keep_every < 1:
        raise ConfigError(f"keep_every must be at least 1 (got {keep_every})")
    protected = set(protect)
    newest_first = sorted(set(committed), reverse=True)
    keep: dict[int, str] = {}
    for i, s in enumerate(newest_first):
        if keep_last is None:
            keep[s] = "keep_last unset"
        elif i < keep_last:
            keep[s] = f"among the newest {keep_last}"
        elif keep_every and s % keep_every == 0:
            keep[s] = f"milestone (keep_every={keep_every})"
        elif s == newest_verified:
            keep[s] = "newest verified step"
        elif s in protected:
            keep[s] = "protected (rollback anchor)"
    delete = [s for s in newest_first if s not in keep]
    newest = newest_first[0] if newest_first else None
    delete_incomplete = sorted(
        s for s in set(incomplete) if newest is not None and s < newest and s != in_flight
    )
    return RetentionPlan(delete=delete, keep=keep, delete_incomplete=delete_incomplete)


class CheckpointStore:
    """Reads and writes steps through a Storage backend. Safe to use from any rank; it performs
    no collectives. Every verification failure is reported as an event naming step and file."""

    def __init__(self, storage: Storage, *, events: EventLog | None = None) -> None:
        self.storage = storage
        self.events = events or EventLog()

    # -- listing -----------------------------------------------------------------------------
    def scan(self) -> dict[int, "StepListing"]:
        """Every step directory with its files and sizes, from one recursive listing (plus one
        shallow listing, so that empty directories of a save that just began show up too). On
        S3 this is a handful of LIST requests however many steps exist, not a HEAD per step."""
        steps: dict[int, StepListing] = {}
        for rel, size in self.storage.list_tree("").items():
            head, sep, rest = rel.partition("/")
            step = parse_step_dir(head)
            if step is not None and sep:
                steps.setdefault(step, StepListing(step, {})).files[rest] = size
        for name in self.storage.list_dirs():
            step = parse_step_dir(name)
            if step is not None:
                steps.setdefault(step, StepListing(step, {}))
        return steps

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
    def resume_counts(self) -> dict[int, int]:
        """How many times a run resumed from each step (``resume-attempts.json``; rank 0 writes
        it). A missing or unreadable file counts as none: it only steers a fallback, never
        decides what is valid."""
        try:
            doc = json.loads(self.storage.read_small(RESUME_LOG))
            return {int(k): int(v) for k, v in doc.get("resumes", {}).items()}
        except (FileNotFoundError, StorageError, ValueError, AttributeError, TypeError):
            return {}

    def record_resume(self, step: int, counts: dict[int, int], still_there: list[int]) -> dict[int, int]:
        """Count one more resume from ``step``; steps no longer committed are forgotten."""
        keep = set(still_there)
        new = {s: n for s, n in counts.items() if s in keep}
        new[step] = new.get(step, 0) + 1
        data = json.dumps({"format": "elastic-resume-resumes", "resumes": {str(k): v for k, v in sorted(new.items())}},
                          indent=1).encode()
        self.storage.write_atomic(RESUME_LOG, [memoryview(data)], size=len(data))
        return new

    def resume_candidates(self, committed: list[int], max_resumes: int) -> list[int]:
        """Newest-first steps a resume should try (``committed`` minus crash-looping ones, see
        :func:`plan_resume`), counting this resume against the first (before loading: a crash
        during the load is a crash too). Only the process that decides (rank 0) calls this."""
        counts = self.resume_counts()
        candidates, dropped = plan_resume(committed, counts, max_resumes)
        for s in dropped:
            self.events.emit("resume_crash_loop", step=s, resumes=counts.get(s, 0), limit=max_resumes,
                             reason=f"resumed {counts.get(s, 0)} times from step {s} without committing a newer step; "
                                    "falling back to an older one")
        if candidates:
            try:
                self.record_resume(candidates[0], counts, committed)
            except (StorageError, OSError) as e:
                self.events.emit("save_failed", step=candidates[0], errors=[f"could not record the resume: {e}"])
        return candidates

    # -- manifest ----------------------------------------------------------------------------
    def manifest_path(self, step: int) -> str:
        return f"{step_dir(step)}/{MANIFEST_NAME}"

    def read_manifest(self, step: int) -> Manifest:
        rel = self.manifest_path(step)
        try:
            data = self.storage.read_small(rel)
        except FileNotFoundError:
            raise CheckpointCorruptError(step, self.storage.display(rel), "no manifest: the step was never committed") from None
        return Manifest.parse(data, step=step, where=self.storage.display(rel))

    # -- writing -----------------------------------------------------------------------------
    def prepare(self, step: int, attempt: str) -> None:
        if not _ATTEMPT_RE.match(attempt):
            raise ConfigError(f"invalid attempt id {attempt!r}")
        self.storage.makedirs(f"{step_dir(step)}/{attempt}")

    def write_file(self, step: int, rel_in_step: str, encoded: "EncodedFile", *, rank: int | None) -> FileEntry:
        result = self.storage.write_atomic(f"{step_dir(step)}/{rel_in_step}", encoded.chunks(), size=encoded.size)
        if result.size != encoded.size:
            raise StorageError(0, f"wrote {result.size} bytes to {rel_in_step} but expected {encoded.size}")
        return FileEntry(rel_in_step, result.size, result.digest, rank)

    def commit(self, manifest: Manifest) -> None:
        """Make the step visible: the create-only write of the manifest is the commit point."""
        rel = self.manifest_path(manifest.step)
        try:
            self.storage.write_create_only(rel, manifest.to_bytes())
        except FileExistsError:
            raise CommitConflictError(
                f"step {manifest.step} is already committed at {self.storage.display(rel)}; "
                "refusing to overwrite it (a second writer, or a resumed run saving a step it "
                "already has). The existing checkpoint is untouched."
            ) from None

    def supersede(self, step: int, *, keep_attempt: str) -> None:
        """Make way for a new commit of ``step`` that this run decided not to use (it was corrupt
        for some rank, or lies on a timeline that was rolled back): remove the old manifest,
        then every attempt directory but ``keep_attempt`` (the new save's data, already written)."""
        self.storage.delete(self.manifest_path(step))
        stale = {rel.split("/", 1)[0] for rel in self.storage.list_tree(step_dir(step))}
        for attempt in sorted(stale - {keep_attempt, MANIFEST_NAME}):
            if "/" not in attempt and _ATTEMPT_RE.match(attempt):
                self.storage.delete_tree(f"{step_dir(step)}/{attempt}")

    def retire(self, step: int) -> None:
        """Make a committed step invisible (manifest first, so no half-deleted step ever looks
        committed), then delete its files."""
        self.storage.delete(self.manifest_path(step))
        self.storage.delete_tree(step_dir(step))

    # -- reading -----------------------------------------------------------------------------
    def read_file(self, manifest: Manifest, entry: FileEntry, *, keep: bool = True) -> "torch.Tensor | None":
        """Read one data file, checking size and digest in the same pass; corruption raises
        CheckpointCorruptError naming the file. ``keep=False`` verifies without holding bytes."""
        rel = f"{step_dir(manifest.step)}/{entry.path}"
        where = self.storage.display(rel)
        try:
            result = self.storage.read(rel, expected_size=entry.size, keep=keep)
        except FileNotFoundError:
            raise CheckpointCorruptError(manifest.step, where, "listed in the manifest but missing") from None
        except SizeMismatchError as e:
            raise CheckpointCorruptError(manifest.step, where, e.strerror or str(e)) from None
        if result.digest != entry.digest:
            raise CheckpointCorruptError(
                manifest.step, where, f"digest mismatch (recorded {entry.digest}, read {result.digest})"
            )
        return result.buffer

    def read_tree(self, manifest: Manifest, entry: FileEntry) -> Any:
        """Read and decode one data file in a single pass, each tensor into storage of its
        own. When decoding fails the rest is still read, so a damaged file is reported by its
        digest (the root cause) and an intact but unreadable one by what is wrong with it."""
        from .serialization import decode_stream

        rel = f"{step_dir(manifest.step)}/{entry.path}"
        where = self.storage.display(rel)
        try:
            with self.storage.open_stream(rel, expected_size=entry.size) as stream:
                try:
                    tree, problem = decode_stream(stream, where=where), None
                except CheckpointCorruptError as e:
                    tree, problem = None, e
                digest = stream.finish()
        except FileNotFoundError:
            raise CheckpointCorruptError(manifest.step, where, "listed in the manifest but missing") from None
        except SizeMismatchError as e:
            raise CheckpointCorruptError(manifest.step, where, e.strerror or str(e)) from None
        if digest != entry.digest:
            raise CheckpointCorruptError(
                manifest.step, where, f"digest mismatch (recorded {entry.digest}, read {digest})"
            )
        if problem is not None:
            raise type(problem)(manifest.step, where, problem.reason)
        return tree

    # -- verification ------------------------------------------------------------------------
    def verify(self, step: int, *, full: bool = True, listing: StepListing | None = None) -> StepReport:
        """Quick: the manifest validates and every file is present with its size. Full: digests
        too (reads every byte once, through a small buffer). ``listing`` reuses a scan."""
        if listing is None:
            listing = StepListing(step, self.storage.list_tree(step_dir(step)))
        if not listing.committed:
            return StepReport(step, "incomplete", size=listing.size)
        try:
            manifest = self.read_manifest(step)
        except CheckpointCorruptError as e:
            return StepReport(step, "corrupt", problems=[(e.file or MANIFEST_NAME, e.reason)])
        report = StepReport(step, "committed", manifest=manifest, size=manifest.total_bytes)
        for entry in manifest.files:
            where = self.storage.display(f"{step_dir(step)}/{entry.path}")
            have = listing.files.get(entry.path)
            if have is None:
                report.problems.append((where, "listed in the manifest but missing"))
            elif have != entry.size:
                report.problems.append((where, f"size {have} bytes, manifest records {entry.size}"))
            elif full:
                try:
                    self.read_file(manifest, entry, keep=False)
                except CheckpointCorruptError as e:
                    report.problems.append((where, e.reason))
        if report.problems:
            report.status = "corrupt"
        return report

    def verify_all(self, *, full: bool) -> list[StepReport]:
        """Reports for every step directory, newest first, from one scan."""
        listing = self.scan()
        return [self.verify(s, full=full, listing=listing[s]) for s in sorted(listing, reverse=True)]

    def report_corruption(self, step: int, file: str | None, reason: str, **fields: Any) -> None:
        self.events.emit("corruption_found", step=step, file=file, reason=reason, **fields)

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
    def prune(
        self,
        *,
        keep_last: int | None,
        keep_every: int | None = None,
        protect: Iterable[int] = (),
        in_flight: int | None = None,
        newest_verified: int | None = None,
        dry_run: bool = False,
        lock_timeout: float = 60.0,
    ) -> RetentionPlan:
        with self.storage.lock(PRUNE_LOCK, lock_timeout):
            listing = self.scan()
            committed = [s for s in listing if listing[s].committed]
            incomplete = [s for s in listing if not listing[s].committed]
            if newest_verified is None:
                newest_verified = next(
                    (s for s in sorted(committed, reverse=True) if self.verify(s, full=False, listing=listing[s]).ok),
                    None,
                )
            plan = plan_retention(
                committed, incomplete, keep_last=keep_last, keep_every=keep_every,
                newest_verified=newest_verified, protect=protect, in_flight=in_flight,
            )
            if dry_run:
                return plan
            for step in plan.delete:
                self.retire(step)
                self.events.emit("checkpoint_deleted", step=step, reason="retention")
            for step in plan.delete_incomplete:
                self.storage.delete_tree(step_dir(step))
                self.events.emit("incomplete_deleted", step=step)
            return plan


def plan_resume(candidates: Sequence[int], counts: dict[int, int], max_resumes: int) -> tuple[list[int], list[int]]:
    """Pure. Newest-first candidates minus the steps that were resumed from ``max_resumes``
    times already without the run ever committing anything newer (a crash loop: something in
    the next steps kills the job every time). The oldest candidate is never dropped, so a run
    always has somewhere to start; ``max_resumes <= 0`` disables the fallback."""
    cands = list(candidates)
    if max_resumes <= 0 or not cands:
        return cands, []
    dropped = [s for s in cands[:-1] if counts.get(s, 0) >= max_resumes]
    return [s for s in cands if s not in dropped], dropped

