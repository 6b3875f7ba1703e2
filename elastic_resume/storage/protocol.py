"""The contract every storage backend fulfils (paths are relative to the checkpoint root,
'/'-separated), and what they share: digests, and a reader that hashes every byte once as it
arrives in memory of the caller's choosing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import xxhash

from ..errors import ConfigError, SizeMismatchError, StorageError

if TYPE_CHECKING:
    import torch

DIGEST_ALGO = "xxh3_64"
READ_CHUNK = 16 << 20
#: Largest file ``read_small`` returns (manifests, small JSON records): a bigger one is damage
#: or a hostile file, refused before it is read into memory.
SMALL_FILE_LIMIT = 64 << 20


def new_hasher() -> Any:
    return xxhash.xxh3_64()


def format_digest(hasher: Any) -> str:
    return f"{DIGEST_ALGO}:{hasher.hexdigest()}"


def digest_bytes(data: bytes | memoryview) -> str:
    return f"{DIGEST_ALGO}:{xxhash.xxh3_64_hexdigest(data)}"


@dataclass(frozen=True)
class WriteResult:
    size: int
    digest: str


@dataclass(frozen=True)
class ReadResult:
    buffer: torch.Tensor | None  # uint8, exactly the file's bytes (None for digest-only reads)
    digest: str


class ByteStream:
    """A file read front to back exactly once, every byte hashed as it arrives. Callers fill
    memory of their choosing (one big buffer, or each tensor's own storage) with
    ``readinto_exact`` and end with ``finish``, which checks nothing is left and returns the
    digest. Backends implement ``_fill``."""

    def __init__(self, where: str, size: int) -> None:
        self.where = where
        self.size = size
        self.pos = 0
        self.hasher = new_hasher()

    def readinto_exact(self, mv: memoryview) -> None:
        if self.pos + len(mv) > self.size:
            raise short_read(self.where, self.size, self.pos + len(mv))
        done = 0
        while done < len(mv):
            chunk = mv[done : done + READ_CHUNK]
            self._fill(chunk)
            self.hasher.update(chunk)
            done += len(chunk)
        self.pos += len(mv)

    def skip(self, n: int) -> None:
        """Read (and hash) ``n`` bytes that nobody needs: padding, or the rest of a bad file."""
        scratch = memoryview(bytearray(min(max(n, 1), READ_CHUNK)))
        while n > 0:
            take = min(n, len(scratch))
            self.readinto_exact(scratch[:take])
            n -= take

    def finish(self) -> str:
        if self.pos < self.size:
            self.skip(self.size - self.pos)
        self._check_end()
        return format_digest(self.hasher)

    def read_all(self, keep: bool) -> ReadResult:
        """The whole file into one new uint8 tensor (``keep``), or only its digest."""
        if not keep:
            return ReadResult(None, self.finish())
        import torch

        buf = torch.empty(self.size, dtype=torch.uint8)
        self.readinto_exact(tensor_bytes(buf))
        return ReadResult(buf, self.finish())

    def _fill(self, mv: memoryview) -> None:
        raise NotImplementedError

    def _check_end(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> ByteStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (the tensor must outlive the view)."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())).cast("B")


class Storage(Protocol):
    """What the checkpoint store needs from a backend."""

    url: str

    def display(self, rel: str = "") -> str: ...
    def ensure_root(self, *, create: bool, probe_write: bool) -> None: ...
    def makedirs(self, rel: str) -> None: ...
    def write_atomic(self, rel: str, chunks: Iterable[memoryview], size: int | None = None) -> WriteResult: ...
    def write_create_only(self, rel: str, data: bytes | list[memoryview]) -> None: ...
    def replace_if(self, rel: str, data: bytes, expected_digest: str) -> None: ...
    def open_stream(self, rel: str, expected_size: int | None = None) -> ByteStream: ...
    def read(self, rel: str, expected_size: int | None = None, *, keep: bool = True) -> ReadResult: ...
    def read_small(self, rel: str, limit: int = SMALL_FILE_LIMIT) -> bytes: ...
    def read_tail(self, rel: str, n: int) -> tuple[bytes, int]: ...
    def exists(self, rel: str) -> bool: ...
    def list_dirs(self, rel: str = "") -> list[str]: ...
    def list_tree(self, rel: str) -> dict[str, int]: ...
    def delete(self, rel: str) -> None: ...
    def delete_tree(self, rel: str) -> None: ...
    def lock(self, name: str, timeout: float) -> contextlib.AbstractContextManager[None]: ...


def short_read(where: str, got: int, want: int) -> SizeMismatchError:
    return SizeMismatchError(errno.EIO, f"{where} is truncated: {got} of {want} bytes")


def long_read(where: str, got: int, want: int) -> SizeMismatchError:
    return SizeMismatchError(errno.EIO, f"{where} holds {got} bytes, more than the {want} recorded")


def check_rel(rel: str) -> str:
    # Callers pass only store-generated or manifest-validated paths; this is a last guard.
    if rel.startswith("/") or ".." in rel.split("/"):
        raise ConfigError(f"storage path {rel!r} escapes the checkpoint root")
    return rel


def read_whole(storage: Any, rel: str, expected_size: int | None, keep: bool) -> ReadResult:
    """Both backends' ``read``: the whole file through its ByteStream, errors named by path."""
    with storage.open_stream(rel, expected_size) as stream:
        try:
            return stream.read_all(keep)
        except (SizeMismatchError, StorageError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 - every other failure becomes one clear StorageError
            raise storage._error("read", rel, e) from None
