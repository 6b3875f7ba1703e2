"""Small JSON records kept at a checkpoint root beside the steps (``resume-attempts.json``,
``rollback-decision.json``): written whole and atomically by rank 0, read with a size bound and
parsed as untrusted. They steer what a run does next; none of them is a checkpoint, and a
missing or damaged one reads as None (the caller says what that means)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import StorageError
from ..storage.protocol import Storage

if TYPE_CHECKING:  # collectives imports torch; the CLI reads these records without it
    from ..collectives import Group

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


def write_record_together(group: Group, storage: Storage, name: str, doc: Any) -> None:
    """Collective: rank 0 writes the record; a failure is raised on every rank."""
    from ..collectives import on_rank0

    on_rank0(group, lambda: write_record(storage, name, doc), error=lambda m: StorageError(0, m),
             what=f"cannot write {name} under {storage.display()}")


def read_record_together(group: Group, storage: Storage, name: str) -> Any:
    """Collective: the record as rank 0 read it (untrusted JSON, or None), the same on every rank."""
    from ..collectives import on_rank0

    return on_rank0(group, lambda: read_record(storage, name), error=lambda m: StorageError(0, m),
                    what=f"cannot read {name} under {storage.display()}")
