"""Small JSON records kept at a checkpoint root beside the steps (``resume-attempts.json``,
``rollback-decision.json``): written whole and atomically by rank 0, read with a size bound and
parsed as untrusted. They steer what a run does next; none of them is a checkpoint, and a
missing or damaged one reads as None (the caller says what that means)."""

from __future__ import annotations

import json
from typing import Any

from ..storage.protocol import Storage

#: No record is anywhere near this; a larger file is damage, refused before it is read.
LIMIT = 1 << 20


def read_record(storage: Storage, name: str) -> Any:
    """The parsed record, or None when it is missing, unreadable, too large or not JSON."""
    try:
        return json.loads(storage.read_small(name, limit=LIMIT))
    except (FileNotFoundError, OSError, ValueError, RecursionError):
        return None


def write_record(storage: Storage, name: str, doc: Any) -> None:
    """Replace the record atomically (a reader sees the old one or the new one, never a mix)."""
    data = json.dumps(doc, indent=1, allow_nan=False).encode()
    storage.write_atomic(name, [memoryview(data)], size=len(data))
