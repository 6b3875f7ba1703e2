"""The manifest: the one commit marker of a step, and the bounds it is read under.

A step exists only once its ``MANIFEST.json`` exists and validates. The manifest lists every data
file (relative path inside the attempt, size, digest, rank, kind), the world size, the drift
fingerprint, user metadata and the training health at save time, and carries a checksum of its
own canonical JSON. Manifests are untrusted input even when their checksum matches: parsing
bounds depth, counts and sizes, and every problem is a ``CheckpointCorruptError`` naming it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointCorruptError
from ..events import jsonable
from ..storage import DIGEST_ALGO, digest_bytes
from .layout import ATTEMPT_RE, FileKind, is_safe_relative_path

MANIFEST_FORMAT = "elastic-resume-manifest"
MANIFEST_VERSION = 1
#: Bounds on what a manifest may claim (untrusted input even when its checksum matches).
MAX_MANIFEST_DEPTH = 64
MAX_MANIFEST_FILES = 1_000_000
MAX_TENSORS = 10_000_000
_LATEST_CREATED = 1e11  # year 5138: a larger creation time is damage, not a date
_FILE_KINDS = frozenset(k.value for k in FileKind)


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


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


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
    kind: str = FileKind.RANK

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "digest": self.digest, "rank": self.rank, "kind": str(self.kind)}


def health_record(health: dict[str, Any] | None) -> tuple[bool, float | None]:
    """(healthy, loss) of a health record read from a checkpoint. A step without a record
    counts as healthy; a loss that is not a finite number is no loss (the record is untrusted
    input)."""
    health = health or {}
    loss = health.get("loss")
    if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss):
        loss = None
    return bool(health.get("healthy", True)), None if loss is None else float(loss)


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

    def health_record(self) -> tuple[bool, float | None]:
        """(healthy, smoothed global loss) as the spike guard recorded them at save time."""
        return health_record(self.health)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def files_of(self, kind: str, rank: int | None = None) -> list[FileEntry]:
        return [f for f in self.files if f.kind == kind and (rank is None or f.rank == rank)]

    @classmethod
    def parse(cls, data: bytes, *, step: int, where: str) -> Manifest:
        """Validate and parse a manifest; every problem is a CheckpointCorruptError naming it."""

        def bad(reason: str) -> CheckpointCorruptError:
            return CheckpointCorruptError(step, where, reason)

        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            why = f"manifest is not valid JSON ({e.msg} at byte {e.pos})" if isinstance(e, json.JSONDecodeError) else None
            raise bad(why or "manifest is not UTF-8") from None
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
        if not isinstance(attempt, str) or not ATTEMPT_RE.match(attempt):
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
            size, digest, rank, kind = f.get("size"), f.get("digest"), f.get("rank"), f.get("kind", FileKind.RANK.value)
            if not isinstance(kind, str) or kind not in _FILE_KINDS:
                raise bad(f"file {path} has unknown kind {kind!r}")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 50:
                raise bad(f"file {path} has invalid size {str(size)[:40]!r}")
            if not isinstance(digest, str) or not digest.startswith(DIGEST_ALGO + ":") or len(digest) > 128:
                raise bad(f"file {path} has unsupported digest {str(digest)[:80]!r}")
            if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size):
                raise bad(f"file {path} has invalid rank {str(rank)[:40]!r}")
            files.append(FileEntry(path, size, digest, rank, FileKind(kind)))
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


def manifest_hash(manifest: Manifest | None) -> int:
    """62 bits of the manifest's checksum (0 for none): what ranks compare to be sure they read
    the same commit, sized so ``[h, -h]`` fit one int64 ``all_reduce(MIN)``."""
    if manifest is None:
        return 0
    return int(manifest.checksum.split(":", 1)[1][:16], 16) >> 2
