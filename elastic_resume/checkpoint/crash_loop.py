"""Crash loops: a run that keeps dying in the steps after its newest checkpoint resumes from the
step before instead of looping forever.

Rank 0 counts resumes per step in ``resume-attempts.json`` at the root. A step resumed from
``max_resumes`` times without anything newer being committed is dropped from the candidates
(:func:`plan_resume`, pure), and the digest of its manifest is kept as the proof that lets a new
save of that step replace exactly it. The file only steers this fallback: a missing or damaged
one counts as no resumes, never as a reason to distrust a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..contract import Event
from ..errors import StorageError
from .layout import RESUME_LOG
from .root_records import read_record, write_record

if TYPE_CHECKING:
    from .repository import StepRepository

_FORMAT = "elastic-resume-resumes"


def plan_resume(candidates: Sequence[int], counts: dict[int, int], max_resumes: int) -> tuple[list[int], list[int]]:
    """Pure. Newest-first candidates minus the steps that were resumed from ``max_resumes``
    times already without the run ever committing anything newer (a crash loop: something in
    the next steps kills the job every time). The oldest candidate is never dropped, so a run
    always has somewhere to start; ``max_resumes <= 0`` disables the fallback."""
    cands = list(candidates)
    if max_resumes <= 0 or not cands:
        return cands, []
    dropped = [s for s in cands[:-1] if counts.get(s, 0) >= max_resumes]
    return [s for s in cands if s not in dropped], dropped


def resume_counts(store: StepRepository) -> dict[int, int]:
    """How many times a run resumed from each step. A missing or unreadable file counts as none."""
    doc = read_record(store.storage, RESUME_LOG)
    try:
        counts = {int(k): int(v) for k, v in doc.get("resumes", {}).items()}
        return {k: v for k, v in counts.items() if k >= 0 and v >= 0}
    except (ValueError, AttributeError, TypeError, OverflowError):
        return {}


def _write(store: StepRepository, counts: dict[int, int]) -> None:
    write_record(store.storage, RESUME_LOG, {"format": _FORMAT, "resumes": {str(k): v for k, v in sorted(counts.items())}})


def resume_candidates(store: StepRepository, committed: list[int], max_resumes: int) -> tuple[list[int], dict[int, str]]:
    """Newest-first steps a resume should try (``committed`` minus crash-looping ones), counting
    this resume against the first (before loading: a crash during the load is a crash too), and
    the dropped steps with the digest their manifest had when dropped. Rank 0 only."""
    counts = resume_counts(store)
    candidates, dropped = plan_resume(committed, counts, max_resumes)
    proofs: dict[int, str] = {}
    for s in dropped:
        digest = store.manifest_digest(s)
        if digest is not None:
            proofs[s] = digest
        store.events.emit(Event.RESUME_CRASH_LOOP, step=s, resumes=counts.get(s, 0), limit=max_resumes,
                          reason=f"resumed {counts.get(s, 0)} times from step {s} without committing a newer step; "
                                 "falling back to an older one")
    if candidates:
        still_there = set(committed)
        new = {s: n for s, n in counts.items() if s in still_there}  # steps gone are forgotten
        new[candidates[0]] = new.get(candidates[0], 0) + 1
        try:
            _write(store, new)
        except (StorageError, OSError) as e:
            store.events.emit(Event.SAVE_FAILED, step=candidates[0], errors=[f"could not record the resume: {e}"])
    return candidates, proofs


def forget(store: StepRepository, step: int) -> None:
    """A re-committed step is new progress: resumes counted against the old one do not count
    against it (else the fallback would drop it again at once)."""
    counts = resume_counts(store)
    if step not in counts:
        return
    del counts[step]
    try:
        _write(store, counts)
    except (StorageError, OSError) as e:  # it only steers a fallback
        store.events.emit(Event.SAVE_FAILED, step=step, errors=[f"could not reset the resume count: {e}"])
