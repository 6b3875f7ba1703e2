"""Raw access to a checkpoint root for tests that damage checkpoints on purpose, on local disk
and on S3 alike (through the storage backend, bypassing the store's checks)."""

from __future__ import annotations

import json
from typing import Any

from elastic_resume.checkpoint.layout import MANIFEST_NAME, step_dir
from elastic_resume.checkpoint.manifest import canonical_json
from elastic_resume.storage import Storage, digest_bytes, open_storage


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


def rewrite_data_header(st: Storage, step: int, index: int, mutate: Any) -> str:
    """Rewrite the safetensors header of the step's ``index``-th data file with ``mutate(header)``
    (a dict in, whose ``__metadata__["elastic_resume"]`` is parsed into a dict; a dict or raw JSON
    text out, and that metadata value a dict or raw JSON text), then fix that file's size and
    digest in the manifest and the manifest's checksum: a hostile file whose every digest
    matches. Returns its path."""
    from elastic_resume.checkpoint.format import META_KEY

    doc = manifest_doc(st, step)
    entry = doc["files"][index]
    rel = f"{step_dir(step)}/{entry['path']}"
    data = get(st, rel)
    hlen = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + hlen])
    header["__metadata__"][META_KEY] = json.loads(header["__metadata__"][META_KEY])
    body = data[8 + hlen :]
    new = mutate(header)
    if isinstance(new, dict) and isinstance(new.get("__metadata__", {}).get(META_KEY), dict):
        new["__metadata__"][META_KEY] = json.dumps(new["__metadata__"][META_KEY])
    text = new.encode() if isinstance(new, str) else json.dumps(new).encode()
    out = len(text).to_bytes(8, "little") + text + body
    put(st, rel, out)
    entry["size"] = len(out)
    entry["digest"] = digest_bytes(out)
    rewrite_manifest(st, step, doc)
    return rel
