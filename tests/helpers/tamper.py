"""Raw access to a checkpoint root for tests that damage checkpoints on purpose, on local disk
and on S3 alike (through the storage backend, bypassing the store's checks)."""

from __future__ import annotations

import json
from typing import Any

from elastic_resume.storage import Storage, digest_bytes, open_storage
from elastic_resume.store import MANIFEST_NAME, canonical_json, step_dir


def raw(url: str, storage_options: dict[str, Any] | None = None) -> Storage:
    return open_storage(url, storage_options or {})


def get(st: Storage, rel: str) -> bytes:
    return st.read_small(rel)


def put(st: Storage, rel: str, data: bytes) -> None:
    st.makedirs(rel.rsplit("/", 1)[0])
    st.write_atomic(rel, [memoryview(data)], size=len(data))


def manifest_doc(st: Storage, step: int) -> dict[str, Any]:
    return json.loads(get(st, f"{step_dir(step)}/{MANIFEST_NAME}"))


def rewrite_manifest(st: Storage, step: int, doc: dict[str, Any], *, fix_checksum: bool = True) -> None:
    """Overwrite a manifest (tests only: the store itself never overwrites one)."""
    doc = dict(doc)
    doc.pop("checksum", None)
    if fix_checksum:
        doc["checksum"] = digest_bytes(canonical_json(doc))
    put(st, f"{step_dir(step)}/{MANIFEST_NAME}", json.dumps(doc).encode())


def data_files(st: Storage, step: int) -> list[str]:
    return [f"{step_dir(step)}/{f['path']}" for f in manifest_doc(st, step)["files"]]


def flip_byte(st: Storage, rel: str, offset: int) -> None:
    data = bytearray(get(st, rel))
    data[offset % len(data)] ^= 0x01
    put(st, rel, bytes(data))


def truncate(st: Storage, rel: str, length: int) -> None:
    put(st, rel, get(st, rel)[:length])
