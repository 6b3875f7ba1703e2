"""The memory tier: the bytes of the files this rank wrote for its newest committed steps, kept
in host RAM, so a rollback to one of them reads no storage (``tier: memory`` on the restore
events). Storage stays the durable tier; this one only saves the read.

- **What is held.** Each file exactly as it went to storage, in one buffer. A step is held only
  once its commit stands, under its step and attempt id: a restore uses it only for the manifest
  it was committed under (a step saved again, retired or replaced never matches), and checks every
  byte against that manifest's digest. A copy that fails the check is reported
  (``corruption_found`` with ``tier: memory``) and that file is read from storage instead.
- **Cost.** The file is copied into its buffer while it is written (in the save thread for a
  background save, never in the training loop's stall): one copy of this rank's share, about 1/N
  of the replicated state at N ranks, per save. ``keep`` steps are held, plus the one being
  written; buffers of evicted steps are reused, so pages are faulted in once.
- **A restore takes the buffers.** Decoded tensors are views of the bytes they came from, and a
  restored optimizer keeps those views as its state: a buffer handed to a restore therefore
  leaves the tier (no copy, and nothing the tier does later can touch live state). A rollback
  re-commits its anchor at once, which holds it again.

At N ranks every rank holds only the files it wrote; a restore from memory has each rank send its
own files to the others (``parallel_read``), as the parallel restore does with files read from
storage.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointCorruptError, CheckpointSaveError
from ..storage import digest_bytes, tensor_bytes
from .layout import FileKind

if TYPE_CHECKING:
    from .format import Payload
    from .manifest import FileEntry, Manifest
    from .verified_reader import StepReader

#: Newest committed steps a manager keeps in memory by default.
DEFAULT_MEMORY_KEEP = 2


class HeldBytes:
    """One file's bytes as this rank wrote them; a :class:`~.format.Payload` to write from."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.size = buffer.numel()

    def chunks(self) -> Iterator[memoryview]:
        yield tensor_bytes(self.buffer)


@dataclass
class HeldStep:
    attempt: str
    #: The files this rank wrote, by their path in the step, each exactly its bytes.
    files: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.files.values())


class MemoryTier:
    """The newest ``keep`` committed steps' files this rank wrote (thread-safe: the save thread
    holds, the training thread takes)."""

    def __init__(self, keep: int = DEFAULT_MEMORY_KEEP) -> None:
        self.keep = keep
        self._held: OrderedDict[int, HeldStep] = OrderedDict()  # by step, oldest commit first
        self._spare: list[torch.Tensor] = []  # buffers of evicted steps, for the next copies
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.keep > 0

    @property
    def steps(self) -> list[int]:
        """The steps held, oldest commit first."""
        with self._lock:
            return list(self._held)

    @property
    def nbytes(self) -> int:
        """Host memory the held steps and the spare buffers take."""
        with self._lock:
            return sum(h.nbytes for h in self._held.values()) + sum(b.numel() for b in self._spare)

    def held_files(self, step: int) -> dict[str, torch.Tensor]:
        """The buffers held for ``step``, by file path (empty when it is not held); for
        inspection: the tier checks them against the manifest when a restore takes them."""
        with self._lock:
            held = self._held.get(step)
            return dict(held.files) if held is not None else {}

    # -- saving ------------------------------------------------------------------------------
    def copy(self, payload: Payload) -> HeldBytes:
        """``payload``'s bytes in one buffer (a spare one of the same size when there is one)."""
        with self._lock:
            # By position, not list.remove: tensors compare elementwise, not by identity.
            found = next((i for i, b in enumerate(self._spare) if b.numel() == payload.size), None)
            buffer = self._spare.pop(found) if found is not None else None
        if buffer is None:
            buffer = torch.empty(payload.size, dtype=torch.uint8)
        out, pos = tensor_bytes(buffer), 0
        for chunk in payload.chunks():
            n = len(chunk)
            out[pos : pos + n] = chunk
            pos += n
        if pos != payload.size:
            raise CheckpointSaveError(f"an encoded file came to {pos} bytes where {payload.size} were announced")
        return HeldBytes(buffer)

    def hold(self, step: int, attempt: str, files: dict[str, HeldBytes]) -> None:
        """Hold the files this rank wrote for ``step`` now that its commit (``attempt``) stands;
        replaces what was held for the step and evicts the oldest beyond ``keep``."""
        with self._lock:
            old = self._held.pop(step, None)
            if old is not None:
                self._spare.extend(old.files.values())
            self._held[step] = HeldStep(attempt, {path: f.buffer for path, f in files.items()})
            while len(self._held) > self.keep:
                _, evicted = self._held.popitem(last=False)
                self._spare.extend(evicted.files.values())
            # Spares only serve the next save, whose files have the sizes of the last one.
            self._spare = self._spare[-len(files) :] if files else []

    def release(self, files: Iterable[HeldBytes]) -> None:
        """Buffers of a save that was not committed go back for reuse."""
        with self._lock:
            self._spare.extend(f.buffer for f in files)

    def forget_newer_than(self, step: int) -> None:
        """Steps after ``step`` were retired (a rollback's abandoned timeline)."""
        with self._lock:
            for s in [s for s in self._held if s > step]:
                self._spare.extend(self._held.pop(s).files.values())

    # -- restoring ---------------------------------------------------------------------------
    def covers(self, manifest: Manifest, rank: int) -> bool:
        """Whether every file ``rank`` wrote for this commit of the step is held (and the step
        holds nothing but the files this tier knows: no DCP shards)."""
        with self._lock:
            held = self._held.get(manifest.step)
            if held is None or held.attempt != manifest.attempt:
                return False
            kinds = {FileKind.SHARED, FileKind.RANK}
            return all(e.kind in kinds for e in manifest.files) and all(
                e.path in held.files and held.files[e.path].numel() == e.size for e in manifest.files if e.rank == rank)

    def take(self, manifest: Manifest, entry: FileEntry) -> torch.Tensor | None:
        """The held bytes of ``entry`` of this commit, verified against the manifest's digest,
        handed over (the tier forgets them: see the module's docstring). None when not held.
        A copy that does not match raises CheckpointCorruptError (and is dropped)."""
        with self._lock:
            held = self._held.get(manifest.step)
            if held is None or held.attempt != manifest.attempt or entry.path not in held.files:
                return None
            buffer = held.files.pop(entry.path)
            if not held.files:
                del self._held[manifest.step]
        if buffer.numel() != entry.size:
            raise CheckpointCorruptError(manifest.step, entry.path, f"memory copy holds {buffer.numel()} bytes, "
                                         f"the manifest records {entry.size}")
        digest = digest_bytes(tensor_bytes(buffer))
        if digest != entry.digest:
            raise CheckpointCorruptError(manifest.step, entry.path, f"memory copy's digest mismatch "
                                         f"(recorded {entry.digest}, held {digest})")
        return buffer


def read_held_or_stored(memory: MemoryTier, store: StepReader, manifest: Manifest,
                        entry: FileEntry) -> tuple[torch.Tensor, bool]:
    """``entry``'s verified bytes from memory, else from storage (a memory copy that fails its
    digest is reported, then read from storage); True when they came from memory. Storage
    corruption raises as :meth:`StepReader.read_file` does."""
    try:
        buffer = memory.take(manifest, entry)
    except CheckpointCorruptError as e:
        store.report_corruption(manifest.step, store.file_where(manifest, entry), e.reason, tier="memory",
                                action="read from storage instead")
        buffer = None
    if buffer is not None:
        store.loaded(manifest, entry)
        return buffer, True
    stored = store.read_file(manifest, entry)
    assert stored is not None  # read_file keeps the bytes by default
    return stored, False
