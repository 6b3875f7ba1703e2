"""A checkpoint root on a POSIX file system: atomic writes by temp file, fsync and rename;
create-only by ``os.link``; compare-and-swap under a file lock; a ``filelock`` for prune."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import BadRootError, FileTooLargeError, SizeMismatchError, StorageError
from .protocol import (
    SMALL_FILE_LIMIT,
    ByteStream,
    ReadResult,
    WriteResult,
    check_rel,
    digest_bytes,
    format_digest,
    long_read,
    new_hasher,
    read_whole,
    short_read,
)

REPLACE_LOCK = ".replace.lock"
_RMTREE_ONEXC = sys.version_info >= (3, 12)


class LocalStorage:
    """A directory on a POSIX file system."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root

    def display(self, rel: str = "") -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, check_rel(rel)) if rel else self.root

    def _error(self, action: str, rel: str, e: BaseException) -> StorageError:
        reason = getattr(e, "strerror", None) or e
        return StorageError(getattr(e, "errno", None) or 0, f"cannot {action} {self.display(rel)}: {reason}")

    def ensure_root(self, *, create: bool, probe_write: bool) -> None:
        if not os.path.isdir(self.root):
            if os.path.exists(self.root):
                raise BadRootError(errno.ENOTDIR, f"checkpoint root {self.root} exists but is not a directory")
            if not create:
                raise StorageError(errno.ENOENT, f"checkpoint root {self.root} does not exist")
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as e:
                raise self._error("create checkpoint root", "", e) from None
        if probe_write:
            probe = os.path.join(self.root, f".write-probe-{uuid.uuid4().hex}")
            try:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                raise StorageError(e.errno or 0, f"checkpoint root {self.root} is not writable: {e.strerror}") from None

    def _fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def makedirs(self, rel: str) -> None:
        """Create a directory chain and make each new entry durable in its parent."""
        target = self._p(rel)
        missing = []
        p = target
        while not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        try:
            for d in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(d)
                self._fsync_dir(os.path.dirname(d))
        except OSError as e:
            raise self._error("create directory", rel, e) from None

    def _write_temp(self, rel: str, chunks: Iterable[memoryview]) -> tuple[str, WriteResult]:
        final = self._p(rel)
        tmp = os.path.join(os.path.dirname(final), f".tmp-{os.path.basename(final)}-{uuid.uuid4().hex[:12]}")
        hasher = new_hasher()
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for chunk in chunks:
                hasher.update(chunk)
                n = len(chunk)
                done = os.write(fd, chunk)
                while done < n:  # short writes happen for very large buffers
                    done += os.write(fd, chunk[done:])
                size += n
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp, WriteResult(size, format_digest(hasher))

    def write_atomic(self, rel: str, chunks: Iterable[memoryview], size: int | None = None) -> WriteResult:
        try:
            tmp, result = self._write_temp(rel, chunks)
            os.rename(tmp, self._p(rel))
            self._fsync_dir(os.path.dirname(self._p(rel)))
        except OSError as e:
            raise self._error("write", rel, e) from None
        return result

    def write_with(self, rel: str, write: Callable[[Any], None], *, replace: bool) -> None:
        """Commit what ``write(f)`` writes to ``f`` (an unbuffered binary file) as ``rel``: into
        a temporary file first, synced, then linked (create-only: an existing ``rel`` is never
        replaced) or, with ``replace``, renamed over ``rel`` (readers see the old file or the
        new one). For writers that produce bytes themselves (``torch.save``), with no copy of
        the whole file in memory. On any failure nothing is committed and no temporary is left."""
        final = self._p(rel)
        tmp = os.path.join(os.path.dirname(final), f".tmp-{os.path.basename(final)}-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "xb", buffering=0) as f:
                write(f)
                os.fsync(f.fileno())
            if replace:
                os.rename(tmp, final)
            else:
                try:
                    os.link(tmp, final)  # atomic and refuses to replace an existing name
                except FileExistsError:
                    raise FileExistsError(errno.EEXIST, f"{self.display(rel)} already exists") from None
        except OSError as e:
            if isinstance(e, FileExistsError):
                raise
            raise self._error("write", rel, e) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._fsync_dir(os.path.dirname(final))

    def local_path(self, rel: str) -> str:
        """The file's path on this machine (to map it instead of reading it)."""
        return self._p(rel)

    def write_create_only(self, rel: str, data: bytes | list[memoryview]) -> None:
        try:
            tmp, _ = self._write_temp(rel, data if isinstance(data, list) else [memoryview(data)])
        except OSError as e:
            raise self._error("write", rel, e) from None
        try:
            os.link(tmp, self._p(rel))  # atomic and refuses to replace an existing name
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{self.display(rel)} already exists") from None
        except OSError as e:
            raise self._error("commit", rel, e) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._fsync_dir(os.path.dirname(self._p(rel)))

    def replace_if(self, rel: str, data: bytes, expected_digest: str) -> None:
        # Every replacer of this root takes the same lock, and create-only commits never
        # replace: so the comparison below still holds when the rename lands.
        with self.lock(REPLACE_LOCK, 60.0):
            try:
                current = self.read_small(rel)
            except FileNotFoundError:
                return self.write_create_only(rel, data)
            if digest_bytes(current) != expected_digest:
                raise FileExistsError(errno.EEXIST, f"{self.display(rel)} changed since it was read")
            try:
                tmp, _ = self._write_temp(rel, [memoryview(data)])
                os.rename(tmp, self._p(rel))  # atomic: readers see the old file or the new one
                self._fsync_dir(os.path.dirname(self._p(rel)))
            except OSError as e:
                raise self._error("commit", rel, e) from None

    def open_stream(self, rel: str, expected_size: int | None = None) -> ByteStream:
        try:
            return _LocalStream(self._p(rel), self.display(rel), expected_size)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{self.display(rel)} is missing") from None
        except SizeMismatchError:
            raise
        except OSError as e:
            raise self._error("read", rel, e) from None

    def read(self, rel: str, expected_size: int | None = None, *, keep: bool = True) -> ReadResult:
        """Read a file in one pass, hashing as bytes arrive; ``keep=False`` only hashes."""
        return read_whole(self, rel, expected_size, keep)

    def read_tail(self, rel: str, n: int) -> tuple[bytes, int]:
        try:
            fd = os.open(self._p(rel), os.O_RDONLY | os.O_NOFOLLOW)
            with open(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - n))
                return f.read(n), size
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{self.display(rel)} is missing") from None
        except OSError as e:
            raise self._error("read", rel, e) from None

    def read_small(self, rel: str, limit: int = SMALL_FILE_LIMIT) -> bytes:
        try:
            fd = os.open(self._p(rel), os.O_RDONLY | os.O_NOFOLLOW)
            with open(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > limit:
                    raise FileTooLargeError(errno.EFBIG, f"{self.display(rel)} holds {size} bytes, more than the {limit} allowed")
                return f.read(limit + 1)[:limit]
        except FileTooLargeError:
            raise
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{self.display(rel)} is missing") from None
        except OSError as e:
            raise self._error("read", rel, e) from None

    def exists(self, rel: str) -> bool:
        return os.path.exists(self._p(rel))

    def list_dirs(self, rel: str = "") -> list[str]:
        try:
            with os.scandir(self._p(rel)) as it:
                # A link to a directory counts (a step moved to another disk and linked back is
                # a step, verified like any other); links inside it are not followed.
                return sorted(e.name for e in it if e.is_dir())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise self._error("list", rel, e) from None

    def list_tree(self, rel: str) -> dict[str, int]:
        base = self._p(rel)
        out: dict[str, int] = {}

        def failed(e: OSError) -> None:
            # A directory that cannot be listed must not look empty (an unlistable committed
            # step would pass for "never committed"); only a vanished one is empty.
            if not isinstance(e, FileNotFoundError):
                where = os.path.relpath(e.filename, self.root) if getattr(e, "filename", None) else rel
                raise self._error("list", where if where != "." else "", e)

        tops = [base]
        for top in tops:
            for dirpath, dirs, files in os.walk(top, onerror=failed):
                if dirpath == base:
                    # Directories linked in directly under the listed one (a step directory
                    # moved to another disk) are listed too; deeper links are not followed.
                    tops += [os.path.join(base, d) for d in dirs if os.path.islink(os.path.join(base, d))]
                for name in files:
                    full = os.path.join(dirpath, name)
                    with contextlib.suppress(FileNotFoundError):
                        out[os.path.relpath(full, base).replace(os.sep, "/")] = os.lstat(full).st_size
        return out

    def delete(self, rel: str) -> None:
        try:
            os.unlink(self._p(rel))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._error("delete", rel, e) from None

    def delete_tree(self, rel: str) -> None:
        import shutil

        def failed(_func: Any, path: str, exc: BaseException) -> None:
            if not isinstance(exc, FileNotFoundError):  # deleted meanwhile: that is what we wanted
                raise self._error("delete", os.path.relpath(path, self.root), exc)

        if not os.path.lexists(self._p(rel)):
            return
        if os.path.islink(self._p(rel)):
            # A linked-in directory: the link goes, what it points to (outside this root,
            # perhaps shared) is never deleted through it.
            self.delete(rel)
            return
        if _RMTREE_ONEXC:  # Python 3.12+: onerror is deprecated there
            shutil.rmtree(self._p(rel), onexc=failed)  # type: ignore[call-arg,unused-ignore]
        else:
            shutil.rmtree(self._p(rel), onerror=lambda f, p, info: failed(f, p, info[1]))

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float) -> Iterator[None]:
        from filelock import FileLock, Timeout

        path = os.path.join(self.root, name)
        try:
            lock = FileLock(path, timeout=timeout)
            lock.acquire()
        except Timeout:
            raise StorageError(errno.EBUSY, f"lock {path} is held by another process (waited {timeout:g} s); "
                                            "another prune or commit is running on this root, try again") from None
        except OSError as e:
            raise self._error("take the lock", name, e) from None
        try:
            yield
        finally:
            lock.release()


class _LocalStream(ByteStream):
    def __init__(self, path: str, where: str, expected_size: int | None) -> None:
        # O_NOFOLLOW: a data file is a regular file the writer created; a symlink standing in
        # for one (pointing anywhere) is refused, as verify refuses it.
        self.f = open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb", buffering=0)
        try:
            actual = os.fstat(self.f.fileno()).st_size
            size = actual if expected_size is None else expected_size
            if actual < size:
                raise short_read(where, actual, size)
            if actual > size:
                raise long_read(where, actual, size)
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(self.f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            self.f.close()
            raise
        super().__init__(where, size)

    def _fill(self, mv: memoryview) -> None:
        done = 0
        while done < len(mv):
            n = self.f.readinto(mv[done:])
            if not n:
                raise short_read(self.where, self.pos + done, self.size)
            done += n

    def _check_end(self) -> None:
        if self.f.read(1):
            raise long_read(self.where, os.fstat(self.f.fileno()).st_size, self.size)

    def close(self) -> None:
        self.f.close()
