"""Where bytes are written and read: the one seam to file systems and object stores (the only
package that imports fsspec, s3fs, gcsfs, adlfs).

Backends, one contract (paths are relative to the checkpoint root, '/'-separated): local disk,
and object stores through fsspec (``FsspecStorage``: S3, GCS, Azure Blob, in-process memory).

- ``write_atomic``  no torn file ever stands under its final name. Local: temp name, fsync,
  rename, fsync the directory. S3: one PUT, or a multipart upload whose parts go up concurrently
  and which only becomes visible when completed; GCS/Azure: one upload, visible when complete.
- ``write_create_only``  fails with ``FileExistsError`` if the name exists. Local: ``os.link`` of
  an fsynced temp file (atomic, never overwrites). S3 and Azure: ``If-None-Match: *``; GCS:
  ``ifGenerationMatch=0``; memory: a process-wide lock.
- ``replace_if``  compare-and-swap: replaces a file only while it still holds the bytes whose
  digest the caller names (``FileExistsError`` otherwise); the old content stays readable until
  the new one stands, so no reader ever finds the name missing. Local: a lock and ``rename``
  over the old file. S3 and Azure: ``If-Match`` on the ETag of the bytes just compared; GCS:
  ``ifGenerationMatch`` on their generation.
- ``read``  one pass: bytes land in a single preallocated buffer and are hashed as they arrive.
- ``list_tree``/``list_dirs``/``delete_tree``/``lock``.

Digests are xxh3-64 (tens of GB/s on one core) so hashing never costs more than the disk.
Errors become ``StorageError`` with the path, and never carry secrets (see ``secrets.redact``).

Modules: ``protocol.py`` (the ``Storage`` contract, digests, the one-pass hashed reader),
``local.py``, ``objectstore.py`` (what every fsspec object store shares), ``s3.py``, ``gcs.py``,
``azure.py``, ``memory.py``, ``secrets.py`` (keeping credentials out of messages and logs).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError
from .local import LocalStorage
from .protocol import (
    DIGEST_ALGO,
    SMALL_FILE_LIMIT,
    ByteStream,
    ReadResult,
    Storage,
    WriteResult,
    digest_bytes,
    format_digest,
    new_hasher,
    tensor_bytes,
)
from .secrets import is_secret_name, redact, redact_argv

# scheme -> (module, class, the package it needs); imported on first use, so local-only users
# never import an object-store client.
_BACKENDS = {
    "s3": ("s3", "S3Storage", "s3fs"), "s3a": ("s3", "S3Storage", "s3fs"),
    "gs": ("gcs", "GCSStorage", "gcsfs"), "gcs": ("gcs", "GCSStorage", "gcsfs"),
    "az": ("azure", "AzureStorage", "adlfs"), "abfs": ("azure", "AzureStorage", "adlfs"),
    "abfss": ("azure", "AzureStorage", "adlfs"), "memory": ("memory", "MemoryStorage", "fsspec"),
}


def file_url_path(url: str) -> str:
    """The absolute path a ``file://`` URL names (``file:///data/ckpt``, ``file://localhost/data/ckpt``):
    "file://" alone or "file://ckpt" would otherwise mean the current directory."""
    path = url[len("file://"):]
    if path.startswith("localhost/"):
        path = path[len("localhost"):]
    if not path.startswith("/"):
        raise ConfigError(f"checkpoint root {url!r}: a file:// URL needs an absolute path (file:///path/to/root)")
    return path


def open_storage(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Storage:
    """Pick the backend for a root: a local path, ``file://`` URL, ``s3://``, ``gs://``, ``az://``
    (``abfs://``) or ``memory://`` with ``bucket/prefix``."""
    url = os.fspath(url)
    if not url:
        raise ConfigError("checkpoint root is empty; give a directory or an s3://bucket/prefix URL")
    if url.startswith("file://"):
        return LocalStorage(file_url_path(url))
    if "://" in url:
        scheme = url.split("://", 1)[0]
        found = _BACKENDS.get(scheme)
        if found is None:
            # Other fsspec file systems lack one of the two preconditions a commit needs
            # (atomic create-only, compare-and-swap), or we have not proven they have them.
            raise ConfigError(
                f"checkpoint root {url!r}: unsupported scheme {scheme!r} (use a local path, file://, s3://, "
                "gs://, az:// or memory://)"
            )
        module, name, package = found
        try:
            import importlib

            backend = getattr(importlib.import_module(f".{module}", __name__), name)
            storage: Storage = backend(url, storage_options or {})
            return storage
        except ImportError:
            raise ConfigError(f"checkpoint root {url!r} needs the {package} package "
                              f"(pip install {package})") from None
    return LocalStorage(url)


__all__ = ["DIGEST_ALGO", "SMALL_FILE_LIMIT", "ByteStream", "LocalStorage", "ReadResult", "Storage", "WriteResult",
           "digest_bytes", "file_url_path", "format_digest", "is_secret_name", "new_hasher", "open_storage", "redact",
           "redact_argv",
           "tensor_bytes"]
