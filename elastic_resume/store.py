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

import calendar
import json
import math
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointCorruptError,
    CheckpointUnreadableError,
    CommitConflictError,
    ConfigError,
    StorageError,
)
from .events import EventLog, jsonable
from .storage import DIGEST_ALGO, FileTooLargeError, SizeMismatchError, Storage, digest_bytes

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
_ATTEMPT_TIME_RE = re.compile(r"^(\d{8}T\d{6})-")
#: Bounds on what a manifest may claim (untrusted input even when its checksum matches).
MAX_MANIFEST_DEPTH = 64
MAX_MANIFEST_FILES = 1_000_000
MAX_TENSORS = 10_000_000
_LATEST_CREATED = 1e11  # year 5138: a larger creation time is damage, not a date


def step_dir(step: int) -> str:
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step_dir(name: str) -> int | None:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


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


def new_attempt_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:10]


def attempt_time(attempt: str) -> float | None:
    """When a save began, from its attempt id (rank 0's clock), or None for a foreign name."""
    m = _ATTEMPT_TIME_RE.match(attempt)
    if not m:
        return None
    try:
        return float(calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%S")))
    except ValueError:
        return None


def json_depth_exceeds(doc: Any, limit: int) -> bool:
    """True if ``doc`` nests deeper than ``limit`` (iterative: never recurses itself)."""
    stack = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return False


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
    #: Digest of the manifest file's exact bytes (as read, or as written by ``to_bytes``): what
    #: a later replacement of this step compares against.
    raw_digest: str = ""

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
        data = json.dumps(body, sort_keys=True, indent=1).encode() + b"\n"
        self.raw_digest = digest_bytes(data)
        return data

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
        except RecursionError:
            raise bad("manifest nests too deeply to be one of ours") from None
        if not isinstance(doc, dict):
            raise bad("manifest is not a JSON object")
        if json_depth_exceeds(doc, MAX_MANIFEST_DEPTH):
            raise bad(f"manifest nests deeper than {MAX_MANIFEST_DEPTH} levels")
        if doc.get("format") != MANIFEST_FORMAT:
            raise bad(f"not an elastic-resume manifest (format={doc.get('format')!r})")
        version = doc.get("version")
        if version != MANIFEST_VERSION:
            raise bad(
                f"unknown manifest version {version!r}; this elastic-resume reads version "
                f"{MANIFEST_VERSION} (a newer release may have written it: upgrade to read it)"
            )
        checksum = doc.pop("checksum", None)
        try:
            recomputed = digest_bytes(canonical_json(doc))
        except (ValueError, TypeError, RecursionError):
            raise bad("manifest cannot be re-serialized to check its checksum") from None
        if not isinstance(checksum, str) or recomputed != checksum:
            raise bad("manifest checksum does not match its contents (edited or damaged)")
        if doc.get("step") != step:
            raise bad(f"manifest says step {doc.get('step')!r} but lies in the directory of step {step}")
        attempt = doc.get("attempt")
        if not isinstance(attempt, str) or not _ATTEMPT_RE.match(attempt):
            raise bad(f"invalid attempt id {attempt!r}")
        world_size = doc.get("world_size")
        if not isinstance(world_size, int) or isinstance(world_size, bool) or not 1 <= world_size <= 1 << 24:
            raise bad(f"invalid world size {str(world_size)[:40]!r}")
        files_doc = doc.get("files")
        if not isinstance(files_doc, list) or not files_doc:
            raise bad("manifest lists no files")
        if len(files_doc) > MAX_MANIFEST_FILES:
            raise bad(f"manifest lists {len(files_doc)} files, more than the {MAX_MANIFEST_FILES} allowed")
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
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 50:
                raise bad(f"file {path} has invalid size {str(size)[:40]!r}")
            if not isinstance(digest, str) or not digest.startswith(DIGEST_ALGO + ":") or len(digest) > 128:
                raise bad(f"file {path} has unsupported digest {str(digest)[:80]!r}")
            if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size):
                raise bad(f"file {path} has invalid rank {str(rank)[:40]!r}")
            files.append(FileEntry(path, size, digest, rank, kind))
        if len({f.path for f in files}) != len(files):
            raise bad("manifest lists a file twice")
        created = doc.get("created")
        if isinstance(created, bool) or not isinstance(created, (int, float)) or not (
                math.isfinite(created) and 0 <= created < _LATEST_CREATED):
            raise bad(f"invalid creation time {str(created)[:40]!r}")
        sections = {}
        for name in ("metadata", "fingerprint", "health", "extra"):
            value = doc.get(name, {})
            if not isinstance(value, dict):
                raise bad(f"manifest section {name!r} is not an object")
            sections[name] = value
        extra = sections["extra"]
        for key in ("replicated_keys", "per_rank_keys"):
            keys = extra.get(key, [])
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise bad(f"extra.{key} is not a list of names")
        count = extra.get("replicated_tensors", 0)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_TENSORS:
            raise bad(f"extra.replicated_tensors is {str(count)[:40]!r}; expected a count from 0 to {MAX_TENSORS}")
        return cls(
            step=step,
            attempt=attempt,
            world_size=world_size,
            files=files,
            created=float(created),
            metadata=sections["metadata"],
            fingerprint=sections["fingerprint"],
            health=sections["health"],
            extra=extra,
            checksum=checksum,
            raw_digest=digest_bytes(data),
        )


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
    loadable: Iterable[int] | None = None,
) -> RetentionPlan:
    """Pure retention decision over committed steps and which of them are ``loadable`` (full
    verification passed; None: all of them, or all up to ``newest_verified`` when that is given).

    ``keep_last`` counts loadable steps only, and a committed step is deleted only when it is
    older than the ``keep_last`` newest loadable steps, all kept: so retention never leaves
    fewer loadable steps than ``min(keep_last, loadable before)`` and never deletes the newest
    loadable one. Unloadable steps newer than that are kept as evidence (a resume reports and
    skips them). Milestones (``keep_every``) and ``protect``-ed steps (rollback anchors) are
    always kept. Incomplete directories are deleted only when older than the newest loadable
    step (never a save that resumed from it and is still writing) and not ``in_flight``."""
    if keep_last is not None and keep_last < 1:
        raise ConfigError(f"keep_last must be at least 1 (got {keep_last})")
    if keep_every is not None and keep_every < 1:
        raise ConfigError(f"keep_every must be at least 1 (got {keep_every})")
    protected = set(protect)
    newest_first = sorted(set(committed), reverse=True)
    if loadable is not None:
        good = set(loadable)
    elif newest_verified is not None:
        good = {s for s in newest_first if s <= newest_verified}
    else:
        good = set(newest_first)
    good_newest_first = [s for s in newest_first if s in good]
    window = good_newest_first[:keep_last] if keep_last is not None else good_newest_first
    boundary = window[-1] if keep_last is not None and len(window) == keep_last else None
    keep: dict[int, str] = {}
    for s in newest_first:
        if keep_last is None:
            keep[s] = "keep_last unset"
        elif window and s == window[0]:
            keep[s] = "newest verified step"
        elif s in window:
            keep[s] = f"among the newest {keep_last} loadable"
        elif keep_every and s % keep_every == 0:
            keep[s] = f"milestone (keep_every={keep_every})"
        elif s in protected:
            keep[s] = "protected (rollback anchor)"
        elif boundary is None:
            keep[s] = f"fewer than {keep_last} loadable steps exist" if s in good else "not loadable (kept as evidence)"
        elif s > boundary:
            keep[s] = "not loadable, newer than the kept steps (kept as evidence)"
    delete = [s for s in newest_first if s not in keep]
    newest_good = good_newest_first[0] if good_newest_first else None
    delete_incomplete = sorted(
        s for s in set(incomplete) if newest_good is not None and s < newest_good and s != in_flight
    )
    return RetentionPlan(delete=delete, keep=keep, delete_incomplete=delete_incomplete)


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

    def __init__(self, storage: Storage, *, events: EventLog | None = None) -> None:
        self.storage = storage
        self.events = events or EventLog()
        # step -> raw digest of a manifest this process found (or made) loadable: a step whose
        # manifest is unchanged and whose files still have their sizes is not read again.
        self._known_loadable: dict[int, str] = {}
        # step -> (raw manifest digest, problems) of a step found unloadable: judged once, not
        # read in full again at every prune while it stands unchanged.
        self._known_unloadable: dict[int, tuple[str, list[tuple[str, str]]]] = {}

    # -- listing -----------------------------------------------------------------------------
    def scan(self) -> dict[int, "StepListing"]:
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

    def _scan_each(self, names: list[str], steps: dict[int, "StepListing"]) -> dict[str, int]:
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
    def resume_counts(self) -> dict[int, int]:
        """How many times a run resumed from each step (``resume-attempts.json``; rank 0 writes
        it). A missing or unreadable file counts as none: it only steers a fallback, never
        decides what is valid."""
        try:
            doc = json.loads(self.storage.read_small(RESUME_LOG, limit=1 << 20))
            counts = {int(k): int(v) for k, v in doc.get("resumes", {}).items()}
            return {k: v for k, v in counts.items() if k >= 0 and v >= 0}
        except (FileNotFoundError, OSError, ValueError, AttributeError, TypeError, RecursionError):
            return {}

    def record_resume(self, step: int, counts: dict[int, int], still_there: list[int]) -> dict[int, int]:
        """Count one more resume from ``step``; steps no longer committed are forgotten."""
        keep = set(still_there)
        new = {s: n for s, n in counts.items() if s in keep}
        new[step] = new.get(step, 0) + 1
        self._write_resumes(new)
        return new

    def _write_resumes(self, counts: dict[int, int]) -> None:
        data = json.dumps({"format": "elastic-resume-resumes", "resumes": {str(k): v for k, v in sorted(counts.items())}},
                          indent=1).encode()
        self.storage.write_atomic(RESUME_LOG, [memoryview(data)], size=len(data))

    def resume_candidates(self, committed: list[int], max_resumes: int) -> tuple[list[int], dict[int, str]]:
        """Newest-first steps a resume should try (``committed`` minus crash-looping ones, see
        :func:`plan_resume`), counting this resume against the first (before loading: a crash
        during the load is a crash too), and the dropped steps with the digest of the manifest
        each one had when it was dropped: the proof that lets a new save of that step replace
        exactly it. Only the process that decides (rank 0) calls this."""
        counts = self.resume_counts()
        candidates, dropped = plan_resume(committed, counts, max_resumes)
        proofs: dict[int, str] = {}
        for s in dropped:
            digest = self.manifest_digest(s)
            if digest is not None:
                proofs[s] = digest
            self.events.emit("resume_crash_loop", step=s, resumes=counts.get(s, 0), limit=max_resumes,
                             reason=f"resumed {counts.get(s, 0)} times from step {s} without committing a newer step; "
                                    "falling back to an older one")
        if candidates:
            try:
                self.record_resume(candidates[0], counts, committed)
            except (StorageError, OSError) as e:
                self.events.emit("save_failed", step=candidates[0], errors=[f"could not record the resume: {e}"])
        return candidates, proofs

    # -- manifest ----------------------------------------------------------------------------
    def manifest_path(self, step: int) -> str:
        return f"{step_dir(step)}/{MANIFEST_NAME}"

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
        if not _ATTEMPT_RE.match(attempt):
            raise ConfigError(f"invalid attempt id {attempt!r}")
        self.storage.makedirs(f"{step_dir(step)}/{attempt}")

    def write_file(self, step: int, rel_in_step: str, encoded: "EncodedFile", *, rank: int | None) -> FileEntry:
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
            self._forget_resumes(manifest.step)

    def _forget_resumes(self, step: int) -> None:
        """A re-committed step is new progress: resumes counted against the old one do not
        count against it (else the crash-loop fallback would drop it again at once)."""
        counts = self.resume_counts()
        if step not in counts:
            return
        del counts[step]
        try:
            self._write_resumes(counts)
        except (StorageError, OSError) as e:  # it only steers a fallback
            self.events.emit("save_failed", step=step, errors=[f"could not reset the resume count: {e}"])

    def _remove_stale_attempts(self, step: int, *, keep_attempt: str) -> None:
        """After a replacement: attempt directories the new manifest does not point to."""
        try:
            stale = {rel.split("/", 1)[0] for rel in self.storage.list_tree(step_dir(step)) if "/" in rel}
            for attempt in sorted(stale - {keep_attempt}):
                if _ATTEMPT_RE.match(attempt):
                    self.storage.delete_tree(f"{step_dir(step)}/{attempt}")
        except (StorageError, OSError) as e:  # clean-up: the commit already stands
            self.events.emit("prune_failed", step=step, error=f"could not remove replaced data: {e}")

    def retire(self, step: int) -> None:
        """Make a committed step invisible (manifest first, so no half-deleted step ever looks
        committed), then delete its files."""
        self._known_loadable.pop(step, None)
        self._known_unloadable.pop(step, None)
        self.storage.delete(self.manifest_path(step))
        self.storage.delete_tree(step_dir(step))

    # -- reading -----------------------------------------------------------------------------
    def _where(self, manifest: Manifest, entry: FileEntry) -> str:
        return self.storage.display(f"{step_dir(manifest.step)}/{entry.path}")

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
        except OSError as e:
            raise CheckpointUnreadableError(manifest.step, where, f"unreadable: {e}") from None
        if result.digest != entry.digest:
            raise CheckpointCorruptError(
                manifest.step, where, f"digest mismatch (recorded {entry.digest}, read {result.digest})"
            )
        return result.buffer

    def read_tree(self, manifest: Manifest, entry: FileEntry, *, materialize: bool = True) -> Any:
        """Read and decode one data file in a single pass, each tensor into storage of its
        own (``materialize=False``: shape-only tensors, for verification). When decoding fails
        the rest is still read, so a damaged file is reported by its digest (the root cause)
        and an intact but unreadable one by what is wrong with it."""
        from .serialization import decode_stream

        rel = f"{step_dir(manifest.step)}/{entry.path}"
        where = self.storage.display(rel)
        try:
            with self.storage.open_stream(rel, expected_size=entry.size) as stream:
                try:
                    tree, problem = decode_stream(stream, where=where, materialize=materialize), None
                except CheckpointCorruptError as e:
                    tree, problem = None, e
                digest = stream.finish()
        except FileNotFoundError:
            raise CheckpointCorruptError(manifest.step, where, "listed in the manifest but missing") from None
        except SizeMismatchError as e:
            raise CheckpointCorruptError(manifest.step, where, e.strerror or str(e)) from None
        except OSError as e:
            raise CheckpointUnreadableError(manifest.step, where, f"unreadable: {e}") from None
        if digest != entry.digest:
            raise CheckpointCorruptError(
                manifest.step, where, f"digest mismatch (recorded {entry.digest}, read {digest})"
            )
        if problem is not None:
            raise type(problem)(manifest.step, where, problem.reason)
        return tree

    def read_part(self, manifest: Manifest, entry: FileEntry, *, materialize: bool = True) -> StatePart:
        """One data file as a :class:`StatePart`, its structure checked."""
        part = self.read_tree(manifest, entry, materialize=materialize)
        where = self._where(manifest, entry)
        if not isinstance(part, dict) or not isinstance(part.get("tensors"), dict):
            raise CheckpointCorruptError(manifest.step, where, "data file does not hold a state")
        tensors = part["tensors"]
        if not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < MAX_TENSORS for k in tensors):
            raise CheckpointCorruptError(manifest.step, where, "data file has an invalid tensor index")
        return StatePart(part.get("skeleton"), tensors)

    def read_replicated(self, manifest: Manifest, *, materialize: bool = True) -> tuple[Any, list[Any]]:
        """The replicated state's skeleton and its tensors in order, from every ``shared`` file;
        the pieces must add up to exactly the count the manifest records."""
        skeleton, tensors = None, {}
        for entry in manifest.files_of("shared"):
            part = self.read_part(manifest, entry, materialize=materialize)
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

    def read_per_rank(self, manifest: Manifest, rank: int, *, materialize: bool = True) -> Any:
        """The per-rank state saved by ``rank`` as a tree, or None when the step has none."""
        from .serialization import unflatten

        if not manifest.extra.get("per_rank_keys"):
            return None
        own = manifest.files_of("rank", rank)
        if not own:
            raise CheckpointCorruptError(manifest.step, None, f"no per-rank file for rank {rank}")
        part = self.read_part(manifest, own[0], materialize=materialize)
        count = len(part.tensors)
        if sorted(part.tensors) != list(range(count)):
            raise CheckpointCorruptError(manifest.step, self._where(manifest, own[0]), "per-rank tensors are not numbered 0..n-1")
        return unflatten(part.skeleton, [part.tensors[i] for i in range(count)], where=self._where(manifest, own[0]))

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
                return StepReport(step, "corrupt", problems=[(self.storage.display(step_dir(step)), f"unreadable: {e}")])
        if listing.error is not None:
            return StepReport(step, "corrupt", problems=[(self.storage.display(step_dir(step)), f"unreadable: {listing.error}")])
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
        if report.problems:
            report.status = "corrupt"
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
            report.status, report.problems = "corrupt", list(bad[1])
            return report
        try:
            self._check_pieces(manifest)
        except CheckpointCorruptError as e:
            report.status = "corrupt"
            report.problems.append((e.file or self.storage.display(step_dir(step)), e.reason))
            self._known_unloadable[step] = (manifest.raw_digest, list(report.problems))
            return report
        self._known_loadable[step] = manifest.raw_digest
        return report

    def known_unloadable(self, step: int) -> bool:
        """Whether this process already judged ``step`` unloadable (and reported it)."""
        return step in self._known_unloadable

    def _check_pieces(self, manifest: Manifest) -> None:
        from .serialization import unflatten

        skeleton, tensors = self.read_replicated(manifest, materialize=False)
        # Sharded leaves stand in as placeholders named by the sharded index, so the skeleton
        # is checked by the same decoder restore uses.
        placeholders: dict[str, Any] = {}
        for entry in manifest.files_of("dcp"):
            self.read_part(manifest, entry, materialize=False)
        for entry in manifest.files_of("dcp-meta"):
            from .sharded import parse_metadata

            buf = self.read_file(manifest, entry)
            assert buf is not None
            meta = parse_metadata(bytes(buf.numpy().tobytes()), step=manifest.step, where=self._where(manifest, entry))
            placeholders.update({fqn: None for fqn in meta.state_dict_metadata})
        unflatten(skeleton, tensors, where=self.storage.display(step_dir(manifest.step)), sharded=placeholders)
        for rank in sorted({f.rank for f in manifest.files_of("rank") if f.rank is not None}):
            self.read_per_rank(manifest, rank, materialize=False)

    def verify_all(self, *, full: bool) -> list[StepReport]:
        """Reports for every step directory, newest first, from one scan."""
        listing = self.scan()
        return [self.verify(s, full=full, listing=listing[s]) for s in sorted(listing, reverse=True)]

    def report_corruption(self, step: int, file: str | None, reason: str, **fields: Any) -> None:
        self.events.emit("corruption_found", step=step, file=file, reason=reason, **fields)

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
    def prune(
        self,
        *,
        keep_last: int | None,
        keep_every: int | None = None,
        protect: Iterable[int] = (),
        in_flight: int | None = None,
        dry_run: bool = False,
        lock_timeout: float = 60.0,
    ) -> RetentionPlan:
        """Apply retention (see :func:`plan_retention`). Loadability is decided by full
        verification, newest first, until ``keep_last`` loadable steps are found (steps this
        process wrote or loaded are not read again). Before each deletion the step is looked at
        again: an incomplete directory that has been committed meanwhile, or whose save began
        after the newest loadable commit (a save in flight), is left alone."""
        with self.storage.lock(PRUNE_LOCK, lock_timeout):
            listing = self.scan()
            for s in sorted(s for s in listing if listing[s].error is not None):
                self.report_corruption(s, self.storage.display(step_dir(s)), f"unreadable: {listing[s].error}")
            listing = {s: v for s, v in listing.items() if v.error is None}  # never judged, never deleted
            committed = sorted((s for s in listing if listing[s].committed), reverse=True)
            judged: dict[int, Manifest] = {}
            loadable: list[int] = []
            examined = 0
            for s in committed:
                if keep_last is None or len(loadable) >= keep_last:
                    break
                examined += 1
                known_bad = self.known_unloadable(s)
                report = self.check_loadable(s, listing=listing[s])
                if report.ok:
                    assert report.manifest is not None
                    loadable.append(s)
                    judged[s] = report.manifest
                elif not known_bad:  # reported once per process, not at every save's prune
                    for file, reason in report.problems:
                        self.report_corruption(s, file, reason)
            unjudged_older = committed[examined:] if keep_last is not None else []
            plan = plan_retention(
                committed, [s for s in listing if not listing[s].committed],
                keep_last=keep_last, keep_every=keep_every, protect=protect, in_flight=in_flight,
                # steps past the window are never needed to meet keep_last: they are old
                loadable=set(loadable) | set(unjudged_older),
            )
            newest_attempt = max((t for m in judged.values() if (t := attempt_time(m.attempt)) is not None), default=None)
            stale = [s for s in plan.delete_incomplete if self._started_before(listing[s], newest_attempt)]
            plan = RetentionPlan(delete=plan.delete, keep=plan.keep, delete_incomplete=stale)
            if dry_run:
                return plan
            deleted, deleted_incomplete = [], []
            for step in plan.delete:
                # Deleted steps are older than the loadable ones kept, whatever they hold now;
                # one that is gone already (another prune) needs nothing.
                if not self.has_manifest(step):
                    continue
                self.retire(step)
                deleted.append(step)
                self.events.emit("checkpoint_deleted", step=step, reason="retention")
            for step in plan.delete_incomplete:
                if self.has_manifest(step):
                    continue  # committed while we were deciding
                self.storage.delete_tree(step_dir(step))
                deleted_incomplete.append(step)
                self.events.emit("incomplete_deleted", step=step)
            return RetentionPlan(delete=deleted, keep=plan.keep, delete_incomplete=deleted_incomplete)

    @staticmethod
    def _started_before(listing: StepListing, newest_attempt: float | None) -> bool:
        """Whether every save that wrote into this incomplete directory began strictly before
        the newest loadable commit's save (attempt ids carry rank 0's start time). A directory
        holding a newer attempt may be a save in flight; foreign names are nobody's save."""
        attempts = {rel.split("/", 1)[0] for rel in listing.files if "/" in rel}
        for a in attempts:
            t = attempt_time(a)
            if t is not None and (newest_attempt is None or t >= newest_attempt):
                return False
        return True


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

