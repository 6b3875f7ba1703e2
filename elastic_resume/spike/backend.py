"""The contract between the spike guard and whatever holds the checkpoints it rolls back to.

Two things implement it: ``CheckpointManager`` (a plain loop) and the Lightning callback's
``TrainerBackend`` (checkpoints written by ``ModelCheckpoint`` through ``ElasticCheckpointIO``).
The guard drives it only through these named methods; it never writes a field of its backend.
Every method is collective (every rank calls it, in the same order) unless it says otherwise.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, MutableMapping
from typing import Any, NamedTuple, Protocol

from ..events import EventLog


class CheckpointHealth(NamedTuple):
    """A committed checkpoint as the rollback policy sees it."""

    step: int
    healthy: bool
    """False when it was taken while (or right after) some rank saw trouble: never an anchor."""
    loss: float | None
    """The smoothed global loss recorded with it (for a plateau's lowest-loss anchor)."""


class CheckpointBackend(Protocol):
    """What :class:`~elastic_resume.spike.guard.SpikeGuard` needs of a checkpoint holder."""

    @property
    def rank(self) -> int:
        """This process's rank (the guard records per-step losses on rank 0 only)."""
        ...

    @property
    def events(self) -> EventLog:
        """Where the guard's events go, beside the backend's own."""
        ...

    def checkpoint_health(self) -> list[tuple[int, bool, float | None]]:
        """Every committed checkpoint with its health and recorded loss, newest first, the same
        list on every rank (:class:`CheckpointHealth` tuples)."""
        ...

    def protect(self, steps: Collection[int]) -> None:
        """Keep these steps out of retention's reach (rollback anchors); replaces the last set.
        Local: not a collective."""
        ...

    def allow_recovery_drift(self, patterns: Iterable[str]) -> None:
        """Fingerprint names the guard's own recovery changes (the LR it scales): not drift.
        Local: not a collective."""
        ...

    def allow_replace(self, step: int) -> None:
        """The next save of ``step`` replaces the committed one (the anchor re-committed with
        the recovery state). Local: not a collective."""
        ...

    def retire_newer_than(self, step: int, *, reason: str) -> list[int]:
        """Remove the committed steps newer than ``step`` (an abandoned timeline); returns them."""
        ...

    def restore(self, state: MutableMapping[str, Any], *, step: int | None = None) -> int | None:
        """Load ``step`` (None: the newest loadable) into the live training state; returns it."""
        ...

    @property
    def last_restore_tier(self) -> str | None:
        """Where the last restore's bytes came from (``memory`` or ``storage``). Local."""
        ...

    def save(self, step: int, state: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None,
             blocking: bool = True, health: Mapping[str, Any] | None = None) -> Any:
        """Checkpoint ``step`` with the guard's metadata and health record."""
        ...

    def record_decision(self, decision: Mapping[str, Any]) -> None:
        """Write a rollback's decision (JSON-able) to storage, durably, before it is carried
        out; it replaces the one recorded before."""
        ...

    def recorded_decision(self) -> Any:
        """The last decision recorded (parsed JSON, untrusted), or None; the same on every rank."""
        ...

    def wait(self) -> Any:
        """Wait for a background save (and raise its error)."""
        ...
