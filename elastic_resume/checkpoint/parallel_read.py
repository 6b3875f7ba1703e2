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

The same exchange restores from the memory tier: when every rank holds the files it wrote for
the very commit being restored, each file's owner is the rank that wrote it and it sends the
bytes from memory (verified against the manifest's digest; a copy that fails is read from
storage by its owner). The first phase tells every rank whether all can, so all take the same
path. Without memory and without ``exchange``, every rank reads every file itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..collectives import Group
from ..errors import CheckpointCorruptError, StorageError
from .layout import FileKind
from .manifest import FileEntry, Manifest, manifest_hash
from .memory_tier import MemoryTier, read_held_or_stored
from .saving import assign_tensors
from .verified_reader import StatePart, StepReader


class Replicated(NamedTuple):
    """A step's replicated skeleton and tensors, and where this rank's bytes came from."""

    skeleton: Any
    tensors: list[Any]
    #: ``memory`` when no rank read any replicated file from storage, else ``storage``.
    tier: str


class ParallelRead:
    """Reads the replicated state of a step over ``group`` (collective: every rank calls
    :meth:`read` or :meth:`absent` for the same step, in the same order). ``exchange``: spread
    storage reads over the ranks; ``memory``: serve the step from the ranks' memory tiers when
    every rank holds its part of it."""

    def __init__(self, group: Group, *, exchange: bool = True, memory: MemoryTier | None = None) -> None:
        self.group = group
        self.exchange = exchange
        self.memory = memory if memory is not None and memory.enabled else None

    def absent(self) -> None:
        """This rank could not read the step's manifest: take part in the first phase with
        nothing, so the others learn it and stop."""
        self.group.all_gather_object(None)

    def read(self, store: StepReader, manifest: Manifest) -> Replicated:
        """The step's replicated skeleton and tensors, as ``store.read_replicated`` gives them."""
        held = self.memory is not None and self.memory.covers(manifest, self.group.rank)
        found = self.group.all_gather_object((manifest_hash(manifest), held))
        missing = [r for r, f in enumerate(found) if f is None]
        if missing or len({f[0] for f in found}) > 1:
            why = (f"rank {missing[0]} could not read the manifest" if missing
                   else "the ranks read different manifests of this step")
            raise CheckpointCorruptError(manifest.step, None, why)
        from_memory = manifest.world_size == self.group.world_size and all(f[1] for f in found)
        if not from_memory and not self.exchange:
            return Replicated(*store.read_replicated(manifest), tier="storage")
        entries = manifest.files_of(FileKind.SHARED)
        owner = [e.rank or 0 for e in entries] if from_memory else assign_tensors([e.size for e in entries],
                                                                                  self.group.world_size)
        mine: dict[int, tuple[torch.Tensor, StatePart]] = {}
        failures: dict[int, tuple[str | None, str]] = {}
        stored = not from_memory  # whether this rank read any of its files from storage
        for i, entry in enumerate(entries):
            if owner[i] == self.group.rank:
                try:
                    if from_memory:
                        assert self.memory is not None
                        buffer, held_copy = read_held_or_stored(self.memory, store, manifest, entry)
                        stored |= not held_copy
                    else:
                        read = store.read_file(manifest, entry)
                        assert read is not None  # read_file keeps the bytes by default
                        buffer = read
                    mine[i] = (buffer, store.decode_part(manifest, entry, buffer))
                except CheckpointCorruptError as e:
                    failures[i] = (e.file, e.reason)
                except (StorageError, OSError) as e:
                    failures[i] = (entry.path, f"unreadable: {e}")
        outcomes = self.group.all_gather_object((failures, stored))
        problems = {i: why for per_rank, _ in outcomes for i, why in per_rank.items()}
        if problems:
            file, reason = problems[min(problems)]
            raise CheckpointCorruptError(manifest.step, file, reason)
        tier = "storage" if any(s for _, s in outcomes) else "memory"
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
        return Replicated(*store.assemble_replicated(manifest, parts), tier=tier)
