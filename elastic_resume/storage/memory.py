"""``memory://name/prefix``: fsspec's in-process file system, for tests and notebooks."""

from __future__ import annotations

import errno
import threading
from typing import Any

from .objectstore import FsspecStorage
from .protocol import digest_bytes

_MEMORY_LOCK = threading.Lock()


class MemoryStorage(FsspecStorage):
    """``memory://name/prefix``: fsspec's in-process file system (tests, notebooks; nothing
    outlives the process, and other processes do not see it). Its preconditions hold under one
    process-wide lock, since every writer is in this process."""

    scheme = "memory"

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        from fsspec.implementations.memory import MemoryFileSystem

        super().__init__(url, options, MemoryFileSystem(**options))

    def _p(self, rel: str) -> str:
        return "/" + super()._p(rel)

    def display(self, rel: str = "") -> str:
        return f"memory://{super()._p(rel)}"

    def _check_bucket(self) -> None:
        """A memory root exists as soon as something is written under it."""

    def write_create_only(self, rel: str, data: bytes | list[memoryview]) -> None:
        if isinstance(data, list):
            data = b"".join(data)
        with _MEMORY_LOCK:
            if self.fs.exists(self._p(rel)):
                raise FileExistsError(errno.EEXIST, f"{self.display(rel)} already exists")
            self.fs.pipe_file(self._p(rel), data)

    def replace_if(self, rel: str, data: bytes, expected_digest: str) -> None:
        with _MEMORY_LOCK:
            if not self.fs.exists(self._p(rel)):
                self.fs.pipe_file(self._p(rel), data)
                return
            if digest_bytes(self.fs.cat_file(self._p(rel))) != expected_digest:
                raise FileExistsError(errno.EEXIST, f"{self.display(rel)} changed since it was read")
            self.fs.pipe_file(self._p(rel), data)
