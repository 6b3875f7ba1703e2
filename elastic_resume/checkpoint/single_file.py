"""Single-file Lightning checkpoints: what ``torch.save`` writes, plus an integrity record.

A ``ModelCheckpoint`` path (``epoch=0-step=100.ckpt``, ``last.ckpt``) written by
``ElasticCheckpointIO`` is one file, byte for byte the zip archive ``torch.save`` produces, except
that the archive's comment (the last field of the zip's end-of-central-directory record, which
every zip reader skips) holds a JSON record::

    {"elastic_resume": 1, "digest": "xxh3-128:...", "size": N, "step": S, "written_ns": T, ...}

``digest`` is the hash of the archive exactly as ``torch.save`` wrote it (comment length 0): the
save hashes the bytes as they are, the load hashes the file with the comment cut off again. So
``torch.load(path, weights_only=True)``, ``MyModel.load_from_checkpoint(path)`` and a download
from an http URL open it as any Lightning checkpoint, while a load through the plugin verifies
every byte first. The record sits at the end: listing a directory's checkpoints reads only the
last 64 KiB of each (``written_ns`` and ``health`` choose what to resume).

The checkpoint dict is made weights-only loadable before it is saved (``values.plain``: a path as
text, an enum as its value, a config as a dict). Hyper-parameters with richer types also travel in
our own encoding (``typed_hparams``), which a load through the plugin decodes with the user's
``allowed_classes``: nothing in a file chooses code to run either way.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import os
import struct
import time
from collections import OrderedDict
from typing import Any

import torch

from ..contract import StrEnum
from ..errors import CheckpointCorruptError, StateError, StorageError
from ..storage import open_storage
from ..storage.protocol import Storage, format_digest, new_hasher, tensor_bytes
from .format import decode, encodable, encode
from .manifest import health_record
from .staging import Stager
from .values import DecodeRules, hparams_text, plain

log = logging.getLogger("elastic_resume")

RECORD_KEY = "elastic_resume"
RECORD_VERSION = 1
_EOCD = b"PK\x05\x06"  # end-of-central-directory signature
_EOCD_SIZE = 22  # the record without its comment; the comment length is its last 2 bytes
_MAX_COMMENT = 0xFFFF
#: Bytes at the end of a file that hold the end-of-central-directory record and any comment.
TAIL_BYTES = _EOCD_SIZE + _MAX_COMMENT
#: Where Lightning puts hyper-parameters (the module's, the datamodule's) in a checkpoint.
HPARAMS_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")
_TYPED_HPARAMS = "typed_hparams"
_LEAVES = (str, int, float, bool, bytes, complex, type(None), torch.Size, torch.dtype, torch.device)


@dataclasses.dataclass(frozen=True)
class Record:
    """The integrity record of a single-file checkpoint (decoded with bounds, not trusted)."""

    digest: str
    size: int  #: bytes of the archive as torch.save wrote it
    step: int
    written_ns: int
    health: dict[str, Any] | None
    metadata: dict[str, Any]
    body: bytes = b""  #: the record without its digest, which the digest covers

    @property
    def created(self) -> float:
        return self.written_ns / 1e9

    @property
    def world_size(self) -> int | None:
        """The run's world size as the save recorded it (the file has one writer, global rank 0)."""
        world = self.metadata.get("world_size")
        return world if isinstance(world, int) and not isinstance(world, bool) and world > 0 else None

    def health_record(self) -> tuple[bool, float | None]:
        return health_record(self.health)


# -- saving ---------------------------------------------------------------------------------------
def _weights_only(value: Any, path: str, hparams: bool) -> Any:
    """``value`` in the types ``torch.load(weights_only=True)`` builds. What has no such form
    fails the save naming its place, except in hyper-parameters, which are kept as text (a save
    must not fail ``fit`` because a config holds a callable)."""
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise StateError(f"checkpoint{path} is a {type(value).__name__}, not a plain tensor; "
                             "a single-file checkpoint holds plain tensors only")
        return value.detach()
    if isinstance(value, _LEAVES):
        return value
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _weights_only(v, f"{path}[{k!r}]", hparams)) for k, v in value.items())
    if type(value) in (list, tuple, set):
        return type(value)(_weights_only(v, f"{path}[{i}]", hparams) for i, v in enumerate(value))
    converted = plain(value)
    if converted is not value:
        return _weights_only(converted, path, hparams)
    if hparams:
        text = repr(value)
        log.warning("hyper-parameter %s (%s) cannot be saved without pickle: its text form %s is saved instead",
                    path, type(value).__qualname__, text[:200])
        return text
    raise StateError(f"checkpoint{path} ({type(value).__qualname__}) cannot be checkpointed: "
                     "torch.load(weights_only=True) could not rebuild it; keep plain values, tensors and containers")


def _is_plain(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, *_LEAVES)):
        return True
    if type(value) in (dict, OrderedDict):
        return all(_is_plain(v) for v in value.values())
    return type(value) in (list, tuple) and all(_is_plain(v) for v in value)


def savable(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` as saved: every value weights-only loadable, and the hyper-parameters
    also in our own encoding when their plain form lost a type (an enum, a dataclass)."""
    out = {k: _weights_only(v, f"[{k!r}]", k in HPARAMS_KEYS) for k, v in checkpoint.items()}
    typed = {}
    for key in HPARAMS_KEYS:
        if key in checkpoint and not _is_plain(checkpoint[key]):
            tree = hparams_text(checkpoint[key], f"[{key!r}]", encodable)
            typed[key] = torch.frombuffer(bytearray(b"".join(encode(tree).chunks())), dtype=torch.uint8)
    if typed:
        extra = dict(out.get(RECORD_KEY) or {})
        extra[_TYPED_HPARAMS] = typed
        out[RECORD_KEY] = extra
    return out


def staged(checkpoint: dict[str, Any], stager: Stager) -> dict[str, Any]:
    """``checkpoint`` (as :func:`savable` returns it) with every tensor copied into the
    stager's reusable buffers: a background save writes those while training goes on."""
    tensors: list[torch.Tensor] = []

    def collect(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            tensors.append(node)
        elif isinstance(node, dict):
            for v in node.values():
                collect(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                collect(v)

    collect(checkpoint)
    copies = iter(stager.stage(tensors))

    def swap(node: Any) -> Any:  # the same walk, in the same order
        if isinstance(node, torch.Tensor):
            return next(copies)
        if isinstance(node, dict):
            return type(node)((k, swap(v)) for k, v in node.items())
        if isinstance(node, (list, tuple)):
            return type(node)(swap(v) for v in node)
        return node

    return swap(checkpoint)


class PathKind(StrEnum):
    """What stands at a Lightning checkpoint path."""

    BUNDLE = "bundle"  #: a directory or prefix written by ElasticCheckpointIO before 0.7
    FILE = "file"  #: a file: ours (with an integrity record) or a plain Lightning/torch ``.ckpt``
    MISSING = "missing"  #: nothing


def path_kind(path: str, options: dict[str, Any]) -> PathKind:
    """What stands at ``path`` (a local path, or a URL: a prefix with objects under it is a
    bundle, one object a file)."""
    if "://" not in path:
        if os.path.isfile(path):
            return PathKind.FILE
        return PathKind.BUNDLE if os.path.isdir(path) else PathKind.MISSING
    parent, name = path.rsplit("/", 1)
    if open_storage(path, options).list_tree(""):
        return PathKind.BUNDLE
    return PathKind.FILE if open_storage(parent, options).exists(name) else PathKind.MISSING


def checkpoint_files(dirpath: str, storage: Storage) -> list[str]:
    """``*.ckpt`` files directly under ``dirpath`` (``storage``'s root). A local symlink
    (``save_last="link"``) is not a checkpoint of its own: its target is listed."""
    names = [rel for rel in storage.list_tree("") if "/" not in rel and rel.endswith(".ckpt")]
    if "://" not in dirpath:
        names = [n for n in names if not os.path.islink(os.path.join(dirpath, n))]
    return names


class _HashingWriter:
    """What ``torch.save`` writes into: passed on to ``out`` and hashed as it goes, except the
    stream's last 2 bytes (the zip comment length, 0), held back so that the record's length
    and the record can take their place."""

    def __init__(self, out: Any) -> None:
        self.out, self.hasher, self.size = out, new_hasher(), 0
        # The last 22 bytes so far (the end record once torch.save is done); its last 2 are
        # the ones not yet passed on.
        self.last = b""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if not n:
            return 0
        self.hasher.update(view)
        self.size += n
        held = self.last[-2:]
        if n >= 2:  # large tensors pass through without a copy
            _write_all(self.out, held)
            _write_all(self.out, view[:-2])
        else:
            _write_all(self.out, (held + bytes(view))[:-2])
        self.last = (self.last + bytes(view[-_EOCD_SIZE:]))[-_EOCD_SIZE:]
        return n

    def flush(self) -> None:
        pass

    def finish(self, *, step: int, health: dict[str, Any] | None, metadata: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Write the record after the archive; returns it and the file's size."""
        if self.last[:4] != _EOCD or self.last[-2:] != b"\0\0":
            raise StateError("torch.save wrote an archive without a plain end record; cannot add the integrity record")
        # In JSON's own types (a tuple as a list, an object as its text), as a reader will see it.
        body = json.loads(_body_bytes({RECORD_KEY: RECORD_VERSION, "size": self.size, "step": step,
                                       "written_ns": time.time_ns(), "health": health, "metadata": metadata}))
        if len(_body_bytes(body)) > _MAX_COMMENT - 200:  # the user's metadata is dropped, never the record
            body["metadata"] = {"dropped": "too large for the record"}
        self.hasher.update(_body_bytes(body))
        record = {RECORD_KEY: RECORD_VERSION, "digest": format_digest(self.hasher), **body}
        comment = json.dumps(record, separators=(",", ":")).encode()
        _write_all(self.out, struct.pack("<H", len(comment)) + comment)
        return record, self.size + len(comment)


def _write_all(out: Any, data: Any) -> None:
    view = memoryview(data)
    while len(view):  # an unbuffered file may take less than it was given
        done = out.write(view)
        view = view[done if done is not None else len(view):]


def write_file(out: Any, checkpoint: dict[str, Any], *, step: int, health: dict[str, Any] | None,
               metadata: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Write the file for ``checkpoint`` (already :func:`savable`) to ``out``: torch.save's
    archive, hashed as it streams, then the integrity record. Returns the record and the size."""
    writer = _HashingWriter(out)
    torch.save(checkpoint, writer)  # type: ignore[arg-type]
    return writer.finish(step=step, health=health, metadata=metadata)


def commit(storage: Storage, rel: str, checkpoint: dict[str, Any], *, replace: bool,
           **fields: Any) -> tuple[dict[str, Any], int]:
    """Write and commit ``rel``: create-only, or with ``replace`` an atomic replacement of what
    stands there. A local file streams from ``torch.save`` to disk; an object is assembled in
    memory and uploaded in one request (visible whole or not at all)."""
    from ..storage.local import LocalStorage

    if isinstance(storage, LocalStorage):
        done: list[tuple[dict[str, Any], int]] = []
        storage.write_with(rel, lambda f: done.append(write_file(f, checkpoint, **fields)), replace=replace)
        return done[0]
    buf = io.BytesIO()
    record, size = write_file(buf, checkpoint, **fields)
    view = buf.getbuffer()
    try:
        if replace:
            storage.write_atomic(rel, [view], size)
        else:
            storage.write_create_only(rel, [view])
    finally:
        view.release()
    return record, size


def _body_bytes(body: dict[str, Any]) -> bytes:
    """The record without its digest, as the digest covers it (after the archive's bytes)."""
    return json.dumps({k: v for k, v in body.items() if k != "digest"}, separators=(",", ":"), default=str).encode()


# -- reading --------------------------------------------------------------------------------------
def parse_record(tail: bytes, file_size: int, where: str) -> Record | None:
    """The record from the last bytes of a file (``tail``, at most :data:`TAIL_BYTES`), or None
    when the file carries none (a checkpoint Lightning's default wrote). A record that is there
    but damaged, or that does not match the file's size, is corruption."""
    comment, found = _zip_comment(tail)
    mark = b'{"' + RECORD_KEY.encode() + b'":'
    if not found:
        if mark in tail:  # our record is there, but the zip's end record around it is damaged
            raise CheckpointCorruptError(None, where, "the zip end record holding the integrity record is damaged")
        return None  # not a zip archive at all: torch.load says what it is
    if not comment:
        return None  # what torch.save writes: a plain Lightning checkpoint
    if not comment.startswith(mark):  # neither torch nor Lightning writes a comment
        raise CheckpointCorruptError(None, where, "the zip comment is not an integrity record (damaged?)")

    def fail(reason: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(None, where, f"integrity record {reason}")

    try:
        raw = json.loads(comment)
    except ValueError:
        raise fail("is not valid JSON") from None
    if not isinstance(raw, dict) or raw.get(RECORD_KEY) != RECORD_VERSION:
        raise fail(f"has version {raw.get(RECORD_KEY) if isinstance(raw, dict) else raw!r}; "
                   f"this release reads version {RECORD_VERSION}")
    digest, size, step, written = raw.get("digest"), raw.get("size"), raw.get("step"), raw.get("written_ns")
    health, metadata = raw.get("health"), raw.get("metadata")
    if not isinstance(digest, str) or len(digest) > 200:
        raise fail("has no digest")
    for name, value in (("size", size), ("step", step), ("written_ns", written)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise fail(f"has {name}={value!r}")
    if (health is not None and not isinstance(health, dict)) or not isinstance(metadata, dict):
        raise fail("has a malformed health or metadata field")
    assert isinstance(size, int) and isinstance(step, int) and isinstance(written, int)
    if size + len(comment) != file_size:
        raise fail(f"says the archive is {size} bytes, but the file is {file_size} bytes with a "
                   f"{len(comment)}-byte record (truncated or appended to)")
    return Record(digest, size, step, written, health, metadata, _body_bytes(raw))


def _zip_comment(tail: bytes) -> tuple[bytes, bool]:
    """The zip comment of the archive ending ``tail``: the end record whose comment runs exactly
    to the end (searching back, as zip readers do)."""
    at = len(tail) - _EOCD_SIZE
    while at >= 0:
        at = tail.rfind(_EOCD, 0, at + 4)
        if at < 0:
            break
        (length,) = struct.unpack_from("<H", tail, at + _EOCD_SIZE - 2)
        if at + _EOCD_SIZE + length == len(tail):
            return tail[at + _EOCD_SIZE:], True
        at -= 1
    return b"", False


def read_tail(storage: Storage, rel: str) -> tuple[bytes, int]:
    """The last :data:`TAIL_BYTES` of ``rel`` and its size, in one ranged read."""
    return storage.read_tail(rel, TAIL_BYTES)


def record_of(storage: Storage, rel: str) -> Record | None:
    tail, size = read_tail(storage, rel)
    return parse_record(tail, size, storage.display(rel))


class _MemoryFile(io.RawIOBase):
    """A read-only file over a buffer, so ``torch.load`` copies each tensor once, into its own
    storage, and never the whole file into a ``BytesIO``."""

    def __init__(self, data: memoryview) -> None:
        self._data, self._pos = data, 0

    def close(self) -> None:
        self._data.release()
        super().close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), len(self._data) - self._pos)
        memoryview(b).cast("B")[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def load_verified(storage: Storage, rel: str, rules: DecodeRules) -> tuple[dict[str, Any], Record | None]:
    """The checkpoint dict in ``rel`` and its record: every byte checked against the record's
    digest, then ``torch.load(weights_only=True)`` (tensors and plain containers only). A file
    without a record (Lightning's default format) is loaded the same way, unverified, with None."""
    from ..storage.local import LocalStorage

    if isinstance(storage, LocalStorage):  # mapped, not read: hashed and decoded from the page cache
        import mmap

        try:
            with open(storage.local_path(rel), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if not size:
                    raise CheckpointCorruptError(None, storage.display(rel), "is empty")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    view = memoryview(mapped)
                    try:
                        return load_bytes(view, storage.display(rel), rules)
                    finally:
                        view.release()
        except FileNotFoundError:
            raise StorageError(errno.ENOENT, f"{storage.display(rel)} is missing") from None
    result = storage.read(rel)
    assert result.buffer is not None
    return load_bytes(tensor_bytes(result.buffer), storage.display(rel), rules)


def load_url(url: str, rules: DecodeRules, timeout_s: float = 600.0) -> tuple[dict[str, Any], Record | None]:
    """:func:`load_verified` for an http(s) URL (``Trainer.fit(ckpt_path="https://...")``)."""
    import urllib.request

    from ..storage import redact

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            data = response.read()
    except OSError as e:
        raise StorageError(errno.EIO, f"cannot download {redact(url)}: {e}") from None
    return load_bytes(memoryview(data), redact(url), rules)


def load_bytes(data: memoryview, where: str, rules: DecodeRules) -> tuple[dict[str, Any], Record | None]:
    """:func:`load_verified` of a file's bytes in memory (``where`` names it in errors)."""
    record = parse_record(bytes(data[-TAIL_BYTES:]), len(data), where)
    end = len(data)
    if record is not None:
        hasher = new_hasher()
        with data[:record.size - 2] as head:
            hasher.update(head)
        hasher.update(b"\0\0")
        hasher.update(record.body)
        if format_digest(hasher) != record.digest:
            raise CheckpointCorruptError(record.step, where, "digest mismatch (the file changed after it was written)")
        end = record.size  # without the record: the archive exactly as torch.save wrote it
    reader = _MemoryFile(data[:end])
    try:
        checkpoint = torch.load(reader, map_location="cpu", weights_only=True)  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler's refusals and zip errors
        raise CheckpointCorruptError(None, where, "torch.load(weights_only=True) refused it: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        reader.close()  # the tensors were copied out; the buffer (a mapped file) may be closed now
    if not isinstance(checkpoint, dict):
        raise CheckpointCorruptError(None, where, f"holds a {type(checkpoint).__name__}, not a Lightning checkpoint dict")
    _restore_typed_hparams(checkpoint, rules, where)
    return checkpoint, record


def _restore_typed_hparams(checkpoint: dict[str, Any], rules: DecodeRules, where: str) -> None:
    extra = checkpoint.get(RECORD_KEY)
    typed = extra.pop(_TYPED_HPARAMS, None) if isinstance(extra, dict) else None
    if isinstance(extra, dict) and not extra:
        del checkpoint[RECORD_KEY]
    if not isinstance(typed, dict):
        return
    for key, buf in typed.items():
        if key in HPARAMS_KEYS and isinstance(buf, torch.Tensor) and buf.dtype == torch.uint8 and buf.dim() == 1:
            checkpoint[key] = decode(buf, where=f"{where} [{key!r}]", rules=rules)


_NO_RECORD = "no integrity record (not written by ElasticCheckpointIO)"


class SingleFile:
    """A single-file checkpoint seen as a root of one step, as ``ls``, ``verify`` and ``latest``
    show roots and bundles (``storage``: its directory)."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage, self.name = storage, name
        self._read: tuple[Record | None, str | None] | None = None

    def _record(self) -> tuple[Record | None, str | None]:
        if self._read is None:
            try:
                record = record_of(self.storage, self.name)
                self._read = (record, None if record is not None else _NO_RECORD)
            except CheckpointCorruptError as e:
                self._read = (None, e.reason)
            except OSError as e:
                self._read = (None, f"unreadable: {e}")
        return self._read

    @property
    def ours(self) -> bool:
        """Written by ElasticCheckpointIO: a record, even a damaged one (not a plain file)."""
        return self._record()[1] != _NO_RECORD

    def step_dirs(self) -> list[int]:
        record, _ = self._record()
        return [record.step] if record is not None else []

    committed_steps = step_dirs

    def verify(self, step: int | None = None, *, full: bool = True) -> Any:
        from .verified_reader import StepReport, StepStatus

        record, why = self._record()
        if record is None:
            return StepReport(step or 0, StepStatus.CORRUPT, problems=[(self.name, why or "")])
        if full:
            try:
                load_verified(self.storage, self.name, DecodeRules(warn=False))
            except CheckpointCorruptError as e:
                return StepReport(record.step, StepStatus.CORRUPT, problems=[(self.name, e.reason)], size=record.size,
                                  record=record)
            except OSError as e:
                return StepReport(record.step, StepStatus.CORRUPT, problems=[(self.name, f"unreadable: {e}")],
                                  record=record)
        return StepReport(record.step, StepStatus.COMMITTED, size=record.size, record=record)

    def verify_all(self, *, full: bool, progress: Any = None) -> list[Any]:
        report = self.verify(full=full)
        if progress is not None:
            progress(report.size, report.size)
        return [report]

    def latest(self, *, full: bool = True) -> int | None:
        report = self.verify(full=full)
        return report.step if report.ok else None

    def written_ns(self) -> int:
        record, _ = self._record()
        return record.written_ns if record is not None else -1
