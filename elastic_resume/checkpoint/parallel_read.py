"""A restore whose reads scale with the job: each rank reads a disjoint share of the replicated
(``shared``) files and the ranks exchange the rest over the coordination group, as Megatron's
fully parallel load does. On an object store a restore at N ranks then costs O(N) requests,
not N x N (at 1,000 ranks: a million GETs).

Every rank still ends with the same verified bytes as when it read every file itself:

- an owner reads its files through the store (size and digest checked in the same pass) and
  decodes them under bounds before sending anything;
- what any owner found wrong reaches every rank, which then all report the same file and reason,
  so the agreement protocol skips the step everywhere (corruption found by one rank is agreed);
- receivers decode the bytes they got with the same bounded decoder.

The protocol is collective and each phase is entered by every rank whatever happened before it
(a rank that could not read the manifest still takes part, with nothing), so a failure on one
rank never leaves the others waiting in a broadcast.
"""

from __future__ import annotations

from typing import Any

import torch

from ..collectives import Group
from ..errors import CheckpointCorruptError, StorageError
from .layout import FileKind
from .manifest import FileEntry, Manifest, manifest_hash
from .saving import assign_tensors
from .store import CheckpointStore, StatePart


class ParallelRead:
    """Reads the replicated state of a step over ``group`` (collective: every rank calls
    :meth:`read` or :meth:`absent` for the same step, in the same order)."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def absent(self) -> None:
        """This rank could not read the step's manifest: take part in the first phase with
        nothing, so the others learn it and stop."""
        self.group.all_gather_object(None)

    def read(self, store: CheckpointStore, manifest: Manifest) -> tuple[Any, list[Any]]:
        """The step's replicated skeleton and tensors, as ``store.read_replicated`` gives them."""
        hashes = self.group.all_gather_object(manifest_hash(manifest))
        missing = [r for r, h in enumerate(hashes) if h is None]
        if missing or len(set(hashes)) > 1:
            why = (f"rank {missing[0]} could not read the manifest" if missing
                   else "the ranks read different manifests of this step")
            raise CheckpointCorruptError(manifest.step, None, why)
        entries = manifest.files_of(FileKind.SHARED)
        owner = assign_tensors([e.size for e in entries], self.group.world_size)
        mine: dict[int, tuple[torch.Tensor, StatePart]] = {}
        failures: dict[int, tuple[str | None, str]] = {}
        for i, entry in enumerate(entries):
            if owner[i] == self.group.rank:
                try:
                    buffer = store.read_file(manifest, entry)
                    assert buffer is not None  # read_file keeps the bytes by default
                    mine[i] = (buffer, store.decode_part(manifest, entry, buffer))
                except CheckpointCorruptError as e:
                    failures[i] = (e.file, e.reason)
                except (StorageError, OSError) as e:
                    failures[i] = (entry.path, f"unreadable: {e}")
        found = {i: why for per_rank in self.group.all_gather_object(failures) for i, why in per_rank.items()}
        if found:
            file, reason = found[min(found)]
            raise CheckpointCorruptError(manifest.step, file, reason)
        buffers = [mine[i][0] if i in mine else torch.empty(entry.size, dtype=torch.uint8)
                   for i, entry in enumerate(entries)]
        self.group.broadcast_tensors(buffers, owner)
        parts: list[tuple[FileEntry, StatePart]] = []
        problem: CheckpointCorruptError | None = None
        for i, entry in enumerate(entries):
            if i in mine:
                parts.append((entry, mine[i][1]))
                continue
            try:
                part = store.decode_part(manifest, entry, buffers[i])
            except CheckpointCorruptError as e:  # the owner decoded these very bytes
                problem = problem or e
                continue
            store.loaded(manifest, entry)
            parts.append((entry, part))
        if problem is not None:
            raise problem
        return store.assemble_replicated(manifest, parts)
