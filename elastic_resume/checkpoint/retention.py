"""Retention: which committed steps to keep, decided purely (:func:`plan_retention`), and applying
that decision to a store under its prune lock (:func:`prune`), re-checking each step right before
it is deleted.

Two rules no configuration can break: the newest loadable step is never deleted, and a step is
deleted only when ``keep_last`` loadable steps newer than it are kept (so what is deleted is
never the only loadable state). Rollback anchors (``protect``) and milestones (``keep_every``)
are always kept; unloadable steps newer than the kept ones stay as evidence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..contract import Event
from ..errors import ConfigError
from .layout import PRUNE_LOCK, attempt_time, step_dir
from .manifest import Manifest

if TYPE_CHECKING:
    from .repository import StepListing
    from .verified_reader import StepReader


@dataclass(frozen=True)
class RetentionPlan:
    delete: list[int]
    keep: dict[int, str]  # step -> why it is kept
    delete_incomplete: list[int]


def plan_retention(
    committed: Sequence[int],
    incomplete: Sequence[int],
    *,
    keep_last: int | None,
    keep_every: int | None = None,
    newest_verified: int | None = None,
    protect: Iterable[int] = (),
    in_flight: int | None = None,
    loadable: Iterable[int] | None = None,
) -> RetentionPlan:
    """Pure retention decision over committed steps and which of them are ``loadable`` (full
    verification passed; None: all of them, or all up to ``newest_verified`` when that is given).

    ``keep_last`` counts loadable steps only, and a committed step is deleted only when it is
    older than the ``keep_last`` newest loadable steps, all kept: so retention never leaves
    fewer loadable steps than ``min(keep_last, loadable before)`` and never deletes the newest
    loadable one. Unloadable steps newer than that are kept as evidence (a resume reports and
    skips them). Milestones (``keep_every``) and ``protect``-ed steps (rollback anchors) are
    always kept. Incomplete directories are deleted only when older than the newest loadable
    step (never a save that resumed from it and is still writing) and not ``in_flight``."""
    if keep_last is not None and keep_last < 1:
        raise ConfigError(f"keep_last must be at least 1 (got {keep_last})")
    if keep_every is not None and keep_every < 1:
        raise ConfigError(f"keep_every must be at least 1 (got {keep_every})")
    protected = set(protect)
    newest_first = sorted(set(committed), reverse=True)
    if loadable is not None:
        good = set(loadable)
    elif newest_verified is not None:
        good = {s for s in newest_first if s <= newest_verified}
    else:
        good = set(newest_first)
    good_newest_first = [s for s in newest_first if s in good]
    window = good_newest_first[:keep_last] if keep_last is not None else good_newest_first
    boundary = window[-1] if keep_last is not None and len(window) == keep_last else None
    keep: dict[int, str] = {}
    for s in newest_first:
        if keep_last is None:
            keep[s] = "keep_last unset"
        elif window and s == window[0]:
            keep[s] = "newest verified step"
        elif s in window:
            keep[s] = f"among the newest {keep_last} loadable"
        elif keep_every and s % keep_every == 0:
            keep[s] = f"milestone (keep_every={keep_every})"
        elif s in protected:
            keep[s] = "protected (rollback anchor)"
        elif boundary is None:
            keep[s] = f"fewer than {keep_last} loadable steps exist" if s in good else "not loadable (kept as evidence)"
        elif s > boundary:
            keep[s] = "not loadable, newer than the kept steps (kept as evidence)"
    delete = [s for s in newest_first if s not in keep]
    newest_good = good_newest_first[0] if good_newest_first else None
    delete_incomplete = sorted(
        s for s in set(incomplete) if newest_good is not None and s < newest_good and s != in_flight
    )
    return RetentionPlan(delete=delete, keep=keep, delete_incomplete=delete_incomplete)


def prune(
    store: StepReader,
    *,
    keep_last: int | None,
    keep_every: int | None = None,
    protect: Iterable[int] = (),
    in_flight: int | None = None,
    dry_run: bool = False,
    lock_timeout: float = 60.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> RetentionPlan:
    """Apply retention (see :func:`plan_retention`). Loadability is decided by full
    verification, newest first, until ``keep_last`` loadable steps are found (steps this
    process wrote or loaded are not read again). Before each deletion the step is looked at
    again: an incomplete directory that has been committed meanwhile, or whose save began
    after the newest loadable commit (a save in flight), is left alone. ``progress(phase, done,
    total)``: ``verifying`` in bytes (of the newest ``keep_last`` steps), ``deleting`` in steps."""
    report_progress = progress or (lambda phase, done, total: None)
    # A dry run changes nothing, so it needs no lock (and works on a read-only root).
    with contextlib.nullcontext() if dry_run else store.storage.lock(PRUNE_LOCK, lock_timeout):
        listing = store.scan()
        for s in sorted(s for s in listing if listing[s].error is not None):
            store.report_corruption(s, store.storage.display(step_dir(s)), f"unreadable: {listing[s].error}")
        listing = {s: v for s, v in listing.items() if v.error is None}  # never judged, never deleted
        committed = sorted((s for s in listing if listing[s].committed), reverse=True)
        judged: dict[int, Manifest] = {}
        loadable: list[int] = []
        examined = 0
        window = sum(listing[s].size for s in committed[: keep_last or 0])
        verified_bytes = 0
        for s in committed:
            if keep_last is None or len(loadable) >= keep_last:
                break
            report_progress("verifying", verified_bytes, max(window, verified_bytes))
            examined += 1
            known_bad = store.known_unloadable(s)
            report = store.check_loadable(s, listing=listing[s])
            if report.ok:
                assert report.manifest is not None
                loadable.append(s)
                judged[s] = report.manifest
            elif not known_bad:  # reported once per process, not at every save's prune
                for file, reason in report.problems:
                    store.report_corruption(s, file, reason)
            verified_bytes += listing[s].size
        if examined:
            report_progress("verifying", verified_bytes, max(window, verified_bytes))
        unjudged_older = committed[examined:] if keep_last is not None else []
        plan = plan_retention(
            committed, [s for s in listing if not listing[s].committed],
            keep_last=keep_last, keep_every=keep_every, protect=protect, in_flight=in_flight,
            # steps past the window are never needed to meet keep_last: they are old
            loadable=set(loadable) | set(unjudged_older),
        )
        newest_attempt = max((t for m in judged.values() if (t := attempt_time(m.attempt)) is not None), default=None)
        stale = [s for s in plan.delete_incomplete
                 if _started_before(_attempts(store, listing[s]), newest_attempt)]
        plan = RetentionPlan(delete=plan.delete, keep=plan.keep, delete_incomplete=stale)
        if dry_run:
            return plan
        deleted: list[int] = []
        deleted_incomplete: list[int] = []
        doomed = len(plan.delete) + len(plan.delete_incomplete)
        for step in plan.delete:
            report_progress("deleting", len(deleted), doomed)
            # Deleted steps are older than the loadable ones kept, whatever they hold now;
            # one that is gone already (another prune) needs nothing.
            if not store.has_manifest(step):
                continue
            store.retire(step)
            deleted.append(step)
            store.events.emit(Event.CHECKPOINT_DELETED, step=step, reason="retention")
        for step in plan.delete_incomplete:
            report_progress("deleting", len(deleted) + len(deleted_incomplete), doomed)
            if store.has_manifest(step):
                continue  # committed while we were deciding
            store.storage.delete_tree(step_dir(step))
            deleted_incomplete.append(step)
            store.events.emit(Event.INCOMPLETE_DELETED, step=step)
        if doomed:
            report_progress("deleting", doomed, doomed)
        return RetentionPlan(delete=deleted, keep=plan.keep, delete_incomplete=deleted_incomplete)

def _attempts(store: StepReader, listing: StepListing) -> set[str] | None:
    """The save attempts in an incomplete step directory: from its files and from its
    directories, so a save that created its attempt directory but has not yet written a file
    counts. None for a directory with nothing in it at all: a save may be about to create its
    attempt there, so it is nobody's to delete."""
    attempts = {rel.split("/", 1)[0] for rel in listing.files if "/" in rel}
    attempts.update(store.storage.list_dirs(step_dir(listing.step)))
    return attempts if attempts or listing.files else None


def _started_before(attempts: set[str] | None, newest_attempt: float | None) -> bool:
    """Whether every save that wrote into this incomplete directory began strictly before
    the newest loadable commit's save (attempt ids carry rank 0's start time). A directory
    holding a newer attempt may be a save in flight; foreign names are nobody's save."""
    if attempts is None:
        return False
    for a in attempts:
        t = attempt_time(a)
        if t is not None and (newest_attempt is None or t >= newest_attempt):
            return False
    return True
