"""What every object-store backend shares (through fsspec): paths under ``bucket/prefix``,
errors without secrets, one-pass hashed reads, listings, deletes. Each backend brings its file
system and its two preconditions, create-only and compare-and-swap; a store that offers neither
is refused by ``open_storage``, never used unsafely.
"""

from __future__ import annotations

import contextlib
import errno
import uuid
from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError, FileTooLargeError, StorageError
from .protocol import (
    READ_CHUNK,
    SMALL_FILE_LIMIT,
    ByteStream,
    ReadResult,
    WriteResult,
    check_rel,
    format_digest,
    long_read,
    new_hasher,
    read_whole,
    short_read,
)
from .secrets import redact

#: Endpoints (host, port) this process has connected to once: checked no more.
_REACHED: set[tuple[str, int]] = set()


class FsspecStorage:
    """A root in an object store (or fsspec file system) ``scheme://bucket/prefix``. What every
    such backend shares: paths, errors, reads, listings, deletes. Each backend brings its file
    system and its two preconditions: create-only (the commit point) and compare-and-swap
    (``replace_if``); a backend without both cannot hold checkpoints and is refused."""

    scheme = ""

    def __init__(self, url: str, options: dict[str, Any], fs: Any) -> None:
        rest = url.split("://", 1)[1].strip("/")
        if not rest:
            raise ConfigError(f"checkpoint root {url!r} names no bucket")
        self.bucket, _, prefix = rest.partition("/")
        self.prefix = prefix.strip("/")
        self.url = f"{self.scheme}://{rest}"
        self.options = dict(options)
        self.fs = fs
        self._check_reachable()

    # -- paths and errors ------------------------------------------------------------------
    def _key(self, rel: str) -> str:
        check_rel(rel)
        return "/".join(p for p in (self.prefix, rel) if p)

    def _p(self, rel: str) -> str:
        return f"{self.bucket}/{self._key(rel)}".rstrip("/")

    def display(self, rel: str = "") -> str:
        return f"{self.scheme}://{self._p(rel)}"

    def _error(self, action: str, rel: str, e: BaseException) -> StorageError:
        msg = redact(str(e) or type(e).__name__, self.options)
        if isinstance(e, PermissionError):
            msg += " (check the credentials and the bucket's access policy)"
        return StorageError(getattr(e, "errno", None) or errno.EIO, f"cannot {action} {self.display(rel)}: {msg}")

    def _run(self, coro: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, lambda: coro)

    def _invalidate(self, path: str | None = None) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    #: The first contact with an endpoint: this many connection attempts, each with this timeout.
    #: A client library's own retries for a refused connection take a minute (gcsfs: 6 with
    #: exponential back-off); an endpoint that cannot be reached is a mistake to say at once.
    CONNECT_ATTEMPTS = 3
    CONNECT_TIMEOUT_S = 3.0

    def endpoint(self) -> str | None:
        """The URL the client talks to, where the backend knows it (checked before first use)."""
        return None

    def _check_reachable(self) -> None:
        """Once per endpoint and process, before the first request: can a connection be made?"""
        import socket
        import time
        from urllib.parse import urlsplit

        url = self.endpoint()
        if not url:
            return
        parts = urlsplit(url if "://" in url else f"http://{url}")
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        if not host or (host, port) in _REACHED or _through_proxy(parts.scheme, host):
            return  # behind a proxy a direct connection proves nothing: the client's own retries apply
        why = ""
        for attempt in range(self.CONNECT_ATTEMPTS):
            try:
                socket.create_connection((host, port), timeout=self.CONNECT_TIMEOUT_S).close()
                _REACHED.add((host, port))
                return
            except OSError as e:
                why = e.strerror or str(e) or type(e).__name__
                if attempt + 1 < self.CONNECT_ATTEMPTS:
                    time.sleep(0.5 * (attempt + 1))
        raise StorageError(errno.EHOSTUNREACH, f"cannot reach {self.scheme} endpoint {redact(url, self.options)} for "
                                               f"{self.display()}: {why} ({self.CONNECT_ATTEMPTS} attempts)")

    # -- contract ----------------------------------------------------------------------------
    def _check_bucket(self) -> None:
        try:
            found = self.fs.exists(self.bucket)
        except Exception as e:  # noqa: BLE001 - every failure becomes one clear StorageError
            raise self._error("reach bucket of", "", e) from None
        if not found:
            raise StorageError(errno.ENOENT, f"bucket {self.scheme}://{self.bucket} does not exist")

    def ensure_root(self, *, create: bool, probe_write: bool) -> None:
        self._check_bucket()
        if probe_write:
            probe = f".write-probe-{uuid.uuid4().hex}"
            try:
                self.fs.pipe_file(self._p(probe), b"")
                self.fs.rm_file(self._p(probe))
            except Exception as e:  # noqa: BLE001
                raise self._error("write to", "", e) from None

    def makedirs(self, rel: str) -> None:
        """Object stores have no directories."""

    #: Bytes buffered per upload part: peak memory of a save is a few parts, not the file.
    #: A multiple of 256 KiB (GCS's resumable-upload granularity) and of 4 MiB (Azure's blocks).
    PART_SIZE = 8 * 1024 * 1024

    def write_atomic(self, rel: str, chunks: Iterable[memoryview], size: int | None = None) -> WriteResult:
        """Streamed in parts of :attr:`PART_SIZE` through the file system's own upload (a GCS
        resumable upload, Azure staged blocks), hashing bytes as they pass. Either way the object
        becomes visible only when the upload is completed at ``close``, so no torn file is ever
        seen; on any failure the upload is discarded, never completed."""
        hasher = new_hasher()
        path = self._p(rel)
        written = 0
        try:
            f = self.fs.open(path, "wb", block_size=self.PART_SIZE)
        except Exception as e:  # noqa: BLE001
            raise self._error("write", rel, e) from None
        try:
            for c in chunks:
                hasher.update(c)
                for at in range(0, len(c), self.PART_SIZE):  # the file buffers what it is given: a part at a time
                    f.write(c[at:at + self.PART_SIZE])
                written += len(c)
            if size is not None and written != size:
                raise StorageError(errno.EIO, f"{self.display(rel)}: got {written} bytes, expected {size}")
            f.close()  # completes the upload: the commit of this file
        except BaseException as e:
            _discard(f)
            if isinstance(e, (StorageError, FileExistsError)) or not isinstance(e, Exception):
                raise
            raise self._error("write", rel, e) from None
        self._invalidate(path)
        return WriteResult(written, format_digest(hasher))

    def write_create_only(self, rel: str, data: bytes | list[memoryview]) -> None:
        if isinstance(data, list):
            data = b"".join(data)
        try:
            self.fs.pipe_file(self._p(rel), data, mode="create")
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{self.display(rel)} already exists") from None
        except Exception as e:  # noqa: BLE001
            if precondition_failed(e):
                raise FileExistsError(errno.EEXIST, f"{self.display(rel)} already exists") from None
            raise self._error("commit", rel, e) from None
        self._invalidate(self._p(rel))

    def replace_if(self, rel: str, data: bytes, expected_digest: str) -> None:
        raise NotImplementedError

    def open_stream(self, rel: str, expected_size: int | None = None) -> ByteStream:
        try:
            actual = self.fs.size(self._p(rel))
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{self.display(rel)} is missing") from None
        except Exception as e:  # noqa: BLE001
            raise self._error("read", rel, e) from None
        size = actual if expected_size is None else expected_size
        if actual < size:
            raise short_read(self.display(rel), actual, size)
        if actual > size:
            raise long_read(self.display(rel), actual, size)
        return self._stream(rel, size)

    def _stream(self, rel: str, size: int) -> ByteStream:
        return _FsspecFileStream(self, rel, size)

    def read(self, rel: str, expected_size: int | None = None, *, keep: bool = True) -> ReadResult:
        """Read a file in one pass, hashing as bytes arrive; ``keep=False`` only hashes."""
        return read_whole(self, rel, expected_size, keep)

    def read_tail(self, rel: str, n: int) -> tuple[bytes, int]:
        """The last ``n`` bytes and the object's size: a HEAD and one ranged GET."""
        try:
            self._invalidate(self._p(rel))
            size = int(self.fs.info(self._p(rel))["size"])
            return (self.fs.cat_file(self._p(rel), start=max(0, size - n), end=size) if size else b""), size
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{self.display(rel)} is missing") from None
        except Exception as e:  # noqa: BLE001
            raise self._error("read", rel, e) from None

    def read_small(self, rel: str, limit: int = SMALL_FILE_LIMIT) -> bytes:
        try:
            data = self.fs.cat_file(self._p(rel), start=0, end=limit + 1)
            if len(data) > limit:
                raise FileTooLargeError(errno.EFBIG, f"{self.display(rel)} holds more than the {limit} bytes allowed")
            return data
        except FileTooLargeError:
            raise
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{self.display(rel)} is missing") from None
        except Exception as e:  # noqa: BLE001
            raise self._error("read", rel, e) from None

    def exists(self, rel: str) -> bool:
        try:
            self._invalidate()
            return bool(self.fs.exists(self._p(rel)))
        except Exception as e:  # noqa: BLE001
            raise self._error("check", rel, e) from None

    def list_dirs(self, rel: str = "") -> list[str]:
        try:
            self._invalidate()
            entries = self.fs.ls(self._p(rel), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001
            raise self._error("list", rel, e) from None
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def list_tree(self, rel: str) -> dict[str, int]:
        base = self._p(rel).lstrip("/")
        try:
            self._invalidate()
            found = self.fs.find(self._p(rel), detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:  # noqa: BLE001
            raise self._error("list", rel, e) from None
        if not isinstance(found, dict):  # adlfs, given one blob's name (a single-file checkpoint): a list
            found = {e["name"]: e for e in found if isinstance(e, dict) and "name" in e}
        out = {}
        for name, info in found.items():
            name = name.lstrip("/")
            if info.get("type") == "file" and name.startswith(base + "/"):
                out[name[len(base) + 1 :]] = int(info.get("size") or 0)
        return out

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self._p(rel))
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise self._error("delete", rel, e) from None
        self._invalidate(self._p(rel))

    def delete_tree(self, rel: str) -> None:
        try:
            self.fs.rm(self._p(rel), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise self._error("delete", rel, e) from None
        self._invalidate()

    def lock(self, name: str, timeout: float) -> contextlib.AbstractContextManager[None]:
        # No lock service on an object store. Prune is safe without one: it only deletes steps
        # older than what it keeps, never the newest committed step, and deleting twice is harmless.
        return contextlib.nullcontext()


def open_fs(fs_class: Any, options: dict[str, Any], *, what: str, bad: tuple[type[BaseException], ...] = (TypeError,),
            **defaults: Any) -> Any:
    """``fs_class(**options)`` with our defaults under the user's options (no instance cache:
    each root has its own settings); an option the client refuses is a ConfigError naming it
    without its secrets."""
    try:
        return fs_class(**{"skip_instance_cache": True, **defaults, **options})
    except bad as e:
        raise ConfigError(f"invalid {what} storage option: {redact(str(e), options)}") from None


def precondition_failed(e: BaseException) -> bool:
    """An HTTP 412 (the create-only or compare-and-swap precondition did not hold), however the
    client library spells it."""
    code = getattr(e, "code", None) or getattr(e, "status_code", None) or getattr(e, "status", None)
    return code == 412 or "PreconditionFailed" in str(e) or "ConditionNotMet" in str(e) or type(e).__name__ in (
        "ResourceModifiedError", "ResourceExistsError")


class _FsspecFileStream(ByteStream):
    """A file read front to back through the file system's own buffered reader."""

    def __init__(self, storage: FsspecStorage, rel: str, size: int) -> None:
        super().__init__(storage.display(rel), size)
        self.storage = storage
        try:
            self.f = storage.fs.open(storage._p(rel), "rb", block_size=READ_CHUNK)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{self.where} is missing") from None

    def _fill(self, mv: memoryview) -> None:
        done = 0
        while done < len(mv):
            chunk = self.f.read(len(mv) - done)
            if not chunk:
                raise short_read(self.where, self.pos + done, self.size)
            mv[done : done + len(chunk)] = chunk
            done += len(chunk)

    def _check_end(self) -> None:
        if self.f.read(1):
            raise long_read(self.where, self.size + 1, self.size)

    def close(self) -> None:
        self.f.close()


def _through_proxy(scheme: str, host: str) -> bool:
    """Whether requests to ``host`` go through a proxy (``HTTPS_PROXY`` and the like)."""
    import urllib.request

    proxies = urllib.request.getproxies()
    return bool(proxies.get(scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host)


def _discard(f: Any) -> None:
    """Abandon an upload without completing it: fsspec's buffered files complete the upload in
    ``close()`` (also from ``__del__``), so the file is marked closed after discarding."""
    with contextlib.suppress(Exception):
        f.discard()
    with contextlib.suppress(Exception):
        f.closed = True
