"""Where ranks agree on which checkpoint to load: the one agreement protocol, used by
``CheckpointManager.restore`` (candidates are steps under a root) and by Lightning's
``ElasticCheckpointIO.load_checkpoint`` (candidates are Lightning checkpoint paths).

Candidates come newest first, the same list on every rank (rank 0 lists, then broadcasts). For
each, every rank reads and verifies what it needs; one ``all_reduce(MIN)`` of
``[ok, manifest hash, -manifest hash]`` then says whether every rank succeeded on the same
commit. If so, an optional collective ``finish`` (the sharded DCP load) runs and the candidate is
taken; if not, the candidate is reported (``corruption_found`` by the ranks that found a reason,
``restore_fallback`` by all) and the next older one is tried. No rank ever loads a step another
rank could not, and no two ranks load different steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..collectives import Group, agree_on
from ..contract import Event
from ..errors import NoCheckpointError
from ..events import EventLog
from .reading import ReadAttempt

V = TypeVar("V")


@dataclass(frozen=True)
class Candidate:
    """A checkpoint that may be loaded: a step, at a Lightning checkpoint path when ``path`` is given."""

    step: int
    path: str | None = None

    def fields(self) -> dict[str, Any]:
        """How events name it."""
        return {"step": self.step} if self.path is None else {"step": self.step, "path": self.path}

    def __str__(self) -> str:
        return f"step {self.step}" if self.path is None else f"{self.path} step {self.step}"


@dataclass(frozen=True)
class Skipped:
    """A candidate that was not loaded, with the file and reason (from this rank's view)."""

    candidate: Candidate
    file: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {**self.candidate.fields(), "file": self.file, "reason": self.reason}


@dataclass
class Agreed(Generic[V]):
    """The candidate every rank loaded, what this rank read of it, and what was skipped."""

    candidate: Candidate
    value: V
    skipped: list[Skipped] = field(default_factory=list)


def agree(
    group: Group,
    candidates: Sequence[Candidate],
    read: Callable[[Candidate], ReadAttempt[V]],
    *,
    events: EventLog,
    finish: Callable[[Candidate, V], str | None] | None = None,
    on_skip: Callable[[Candidate, ReadAttempt[V]], None] | None = None,
    nothing: Callable[[str], str],
) -> Agreed[V]:
    """Collective: the newest candidate every rank can read, on the same commit. ``finish`` is a
    collective of its own run on every rank once they agree (it returns a reason to move on, the
    same on every rank, or None). ``on_skip`` sees each candidate passed over. When none is
    left: NoCheckpointError with ``nothing(details)``, the details naming every file and reason."""
    skipped: list[Skipped] = []
    for candidate in candidates:
        attempt = read(candidate)
        ok = attempt.value is not None
        h = attempt.manifest_hash if ok else 0
        all_ok, same = agree_on(group, ok, h)
        file, why = attempt.file, attempt.why
        if all_ok and same:
            assert attempt.value is not None
            why = finish(candidate, attempt.value) if finish is not None else None
            if why is None:
                return Agreed(candidate, attempt.value, skipped)
        if why is not None:
            events.emit(Event.CORRUPTION_FOUND, **candidate.fields(), file=file, reason=why)
        elif all_ok:
            why = "ranks read different manifests for this step"
        else:
            why = "another rank could not verify or load it"
        skipped.append(Skipped(candidate, file, why))
        events.emit(Event.RESTORE_FALLBACK, **candidate.fields(), file=file, reason=why)
        if on_skip is not None:
            on_skip(candidate, attempt)
    details = "; ".join(f"{s.candidate}: {s.file or ''} {s.reason}".replace("  ", " ") for s in skipped)
    raise NoCheckpointError(nothing(details))
