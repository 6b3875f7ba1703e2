"""The checkpoint store: the verified steps under one root (``verified_reader.StepReader`` over the
``repository.StepRepository``), with the policies that remove or skip steps: retention
(``retention.py``), replacing the older steps of a path saved again, and the crash-loop memory
(``crash_loop.py``). No collectives here: who calls what is decided by the writer, the reader and
the agreement (``saving.py``, ``reading.py``, ``agreement.py``). Names on disk are in
``layout.py``, the commit marker in ``manifest.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..contract import Event
from . import crash_loop, retention
from .manifest import Manifest
from .retention import RetentionPlan
from .verified_reader import StepReader


class CheckpointStore(StepReader):
    """Reads and writes steps through a Storage backend, and removes them only with proof. Safe
    to use from any rank; it performs no collectives."""

    def _replaced(self, step: int) -> None:
        crash_loop.forget(self, step)  # a new commit of the step starts its resume count afresh

    # -- crash-loop memory -------------------------------------------------------------------
    def resume_candidates(self, committed: list[int], max_resumes: int) -> tuple[list[int], dict[int, str]]:
        """Newest-first steps a resume should try, minus crash-looping ones, counting this resume
        (see :func:`crash_loop.resume_candidates`). Only the process that decides calls it."""
        return crash_loop.resume_candidates(self, committed, max_resumes)

    # -- removing with proof -----------------------------------------------------------------
    def why_not_standing(self, manifest: Manifest) -> str | None:
        """None when the step ``manifest`` committed still stands as this process committed it
        (the same manifest bytes, every file with its size; its bytes were digested as they
        were written): the proof a deletion of *other* steps holds at the moment it deletes.
        Otherwise what is wrong."""
        report = self.check_loadable(manifest.step)
        if report.ok and report.manifest is not None and report.manifest.raw_digest == manifest.raw_digest:
            return None
        return "; ".join(f"{f}: {r}" for f, r in report.problems) or "its manifest changed since the commit"

    def supersede(self, manifest: Manifest, *, reason: str) -> list[int]:
        """After ``manifest`` was committed at a root that means "the last thing saved here" (a
        Lightning path): retire every other committed step, whatever its number. The proof that
        this removes nothing that is the only loadable state is taken now, before the first
        deletion: the step just committed still stands with the manifest this process wrote
        (the same bytes) and its files (this process wrote and digested them) have their sizes."""
        if (why := self.why_not_standing(manifest)) is not None:
            self.events.emit(Event.PRUNE_FAILED, step=manifest.step,
                             error=f"older steps kept: the step just committed does not verify ({why})")
            return []
        retired = [s for s in self.committed_steps() if s != manifest.step]
        for step in retired:
            self.retire(step)
            self.events.emit(Event.CHECKPOINT_DELETED, step=step, reason=reason)
        return retired

    # -- retention ---------------------------------------------------------------------------
    def prune(self, *, keep_last: int | None, keep_every: int | None = None, protect: Iterable[int] = (),
              in_flight: int | None = None, dry_run: bool = False, lock_timeout: float = 60.0,
              progress: Callable[[str, int, int], None] | None = None) -> RetentionPlan:
        """Apply retention under the prune lock (see :func:`retention.prune`)."""
        return retention.prune(self, keep_last=keep_last, keep_every=keep_every, protect=protect,
                               in_flight=in_flight, dry_run=dry_run, lock_timeout=lock_timeout, progress=progress)
