"""``s3://bucket/prefix`` through s3fs: one PUT, or a multipart upload whose parts go up
concurrently and which becomes visible only when completed; create-only with ``If-None-Match: *``,
compare-and-swap with ``If-Match`` on an ETag; reads as ranged GETs fetched ahead of the reader."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import SizeMismatchError, StorageError
from .objectstore import FsspecStorage, open_fs
from .protocol import ByteStream, WriteResult, digest_bytes, format_digest, new_hasher, short_read
from .secrets import redact


class S3Storage(FsspecStorage):
    """An ``s3://bucket/prefix`` root through s3fs. Settings come from botocore's usual sources
    (``AWS_ENDPOINT_URL``, credential variables, profiles) and from explicit storage options."""

    # Objects up to MULTIPART_THRESHOLD go up in one PUT (fewest requests, and atomic); larger
    # ones as a multipart upload of PART_SIZE parts, MAX_IN_FLIGHT at a time, which is how S3
    # reaches full bandwidth (and the only way past the 5 GiB PUT limit).
    MULTIPART_THRESHOLD = 128 << 20
    PART_SIZE = 32 << 20  # S3 needs >= 5 MiB for every part but the last
    MAX_IN_FLIGHT = 8

    scheme = "s3"

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        import s3fs  # imported here so local-only users never pay for it

        fs = open_fs(s3fs.S3FileSystem, options, what="S3", use_listings_cache=False)
        super().__init__("s3://" + url.split("://", 1)[1], options, fs)

    def _check_bucket(self) -> None:
        try:
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        except FileNotFoundError:
            raise StorageError(errno.ENOENT, f"bucket s3://{self.bucket} does not exist") from None
        except PermissionError as e:
            raise StorageError(
                errno.EACCES,
                f"access to bucket s3://{self.bucket} denied: {redact(str(e), self.options)} "
                "(check the S3 credentials, profile and bucket policy)",
            ) from None
        except Exception as e:  # noqa: BLE001 - every failure becomes one clear StorageError
            raise self._error("reach bucket of", "", e) from None

    def write_atomic(self, rel: str, chunks: Iterable[memoryview], size: int | None = None) -> WriteResult:
        hasher = new_hasher()
        try:
            if size is not None and size <= self.MULTIPART_THRESHOLD:
                data = bytearray(size)
                pos = 0
                for c in chunks:
                    hasher.update(c)
                    data[pos : pos + len(c)] = c
                    pos += len(c)
                if pos != size:
                    raise StorageError(errno.EIO, f"{self.display(rel)}: got {pos} bytes, expected {size}")
                self.fs.pipe_file(self._p(rel), data)
                return WriteResult(size, format_digest(hasher))
            return self._multipart(rel, chunks, hasher)
        except (FileExistsError, StorageError):
            raise
        except Exception as e:  # noqa: BLE001
            raise self._error("write", rel, e) from None

    def _parts(self, chunks: Iterable[memoryview], hasher: Any) -> Iterator[bytearray]:
        """Re-cut the chunk stream into parts of PART_SIZE, hashing bytes as they pass."""
        part = bytearray()
        for chunk in chunks:
            hasher.update(chunk)
            pos = 0
            while pos < len(chunk):
                take = min(self.PART_SIZE - len(part), len(chunk) - pos)
                part += chunk[pos : pos + take]
                pos += take
                if len(part) == self.PART_SIZE:
                    yield part
                    part = bytearray()
        if part:
            yield part

    def _multipart(self, rel: str, chunks: Iterable[memoryview], hasher: Any) -> WriteResult:
        key = self._key(rel)
        fs = self.fs
        mpu = self._run(fs._call_s3("create_multipart_upload", Bucket=self.bucket, Key=key))
        upload_id = mpu["UploadId"]
        in_flight: deque[tuple[int, Any]] = deque()
        done: list[dict[str, Any]] = []
        size = 0
        try:
            for number, part in enumerate(self._parts(chunks, hasher), start=1):
                size += len(part)
                fut = asyncio.run_coroutine_threadsafe(
                    fs._call_s3(
                        "upload_part", Bucket=self.bucket, Key=key, UploadId=upload_id,
                        PartNumber=number, Body=bytes(part),
                    ),
                    fs.loop,
                )
                in_flight.append((number, fut))
                while len(in_flight) >= self.MAX_IN_FLIGHT:
                    n, f = in_flight.popleft()
                    done.append({"PartNumber": n, "ETag": f.result()["ETag"]})
            while in_flight:
                n, f = in_flight.popleft()
                done.append({"PartNumber": n, "ETag": f.result()["ETag"]})
            if not done:  # an empty stream still has to become an (empty) object
                self._run(fs._call_s3("abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id))
                fs.pipe_file(self._p(rel), b"")
                return WriteResult(0, format_digest(hasher))
            self._run(
                fs._call_s3(
                    "complete_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id,
                    MultipartUpload={"Parts": done},
                )
            )
        except BaseException:
            for _, f in in_flight:
                f.cancel()
            with contextlib.suppress(Exception):
                self._run(fs._call_s3("abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id))
            raise
        fs.invalidate_cache(self._p(rel))
        return WriteResult(size, format_digest(hasher))

    def replace_if(self, rel: str, data: bytes, expected_digest: str) -> None:
        fs, bucket, key = self.fs, self.bucket, self._key(rel)

        async def fetch() -> tuple[bytes, str]:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            current, etag = self._run(fetch())
        except FileNotFoundError:
            return self.write_create_only(rel, data)
        except Exception as e:  # noqa: BLE001
            raise self._error("read", rel, e) from None
        if digest_bytes(current) != expected_digest:
            raise FileExistsError(errno.EEXIST, f"{self.display(rel)} changed since it was read")
        try:
            # If-Match on the ETag of exactly the bytes compared: S3 refuses the PUT (412) if
            # anyone replaced the object in between, so the comparison holds at the swap.
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._key(rel), Body=data, IfMatch=etag)
        except Exception as e:  # noqa: BLE001
            if "PreconditionFailed" in str(e) or "412" in str(e) or isinstance(e, FileNotFoundError):
                raise FileExistsError(errno.EEXIST, f"{self.display(rel)} changed since it was read") from None
            raise self._error("commit", rel, e) from None
        self.fs.invalidate_cache(self._p(rel))

    def _stream(self, rel: str, size: int) -> ByteStream:
        return _S3Stream(self, rel, size)


class _S3Stream(ByteStream):
    """Parts of PART_SIZE fetched by ranged GETs, MAX_IN_FLIGHT ahead of the reader."""

    def __init__(self, storage: S3Storage, rel: str, size: int) -> None:
        super().__init__(storage.display(rel), size)
        self.storage, self.key = storage, storage._key(rel)
        part = storage.PART_SIZE
        self.ranges = iter([(s, min(size, s + part)) for s in range(0, size, part)])
        self.pending: deque[Any] = deque()
        self.current = memoryview(b"")
        self.offset = 0
        for _ in range(storage.MAX_IN_FLIGHT):
            self._submit()

    def _submit(self) -> None:
        nxt = next(self.ranges, None)
        if nxt is None:
            return
        start, end = nxt
        fs, bucket, key, where, total = self.storage.fs, self.storage.bucket, self.key, self.where, self.size

        async def fetch() -> bytes:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
            try:
                data = await resp["Body"].read()
            finally:
                resp["Body"].close()
            if len(data) != end - start:
                raise short_read(where, start + len(data), total)
            return data

        self.pending.append(asyncio.run_coroutine_threadsafe(fetch(), fs.loop))

    def _fill(self, mv: memoryview) -> None:
        done = 0
        while done < len(mv):
            if self.offset >= len(self.current):
                if not self.pending:
                    raise short_read(self.where, self.pos + done, self.size)
                try:
                    self.current = memoryview(self.pending.popleft().result())
                except FileNotFoundError:
                    raise FileNotFoundError(errno.ENOENT, f"{self.where} is missing") from None
                except (SizeMismatchError, StorageError):
                    raise
                except Exception as e:  # noqa: BLE001
                    raise StorageError(errno.EIO, f"cannot read {self.where}: {redact(str(e), self.storage.options)}") from None
                self.offset = 0
                self._submit()
            n = min(len(mv) - done, len(self.current) - self.offset)
            mv[done : done + n] = self.current[self.offset : self.offset + n]
            self.offset += n
            done += n

    def close(self) -> None:
        for fut in self.pending:
            fut.cancel()
        self.pending.clear()
