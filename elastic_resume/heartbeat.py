"""Worker side of hang detection: where each worker is, for its launcher to read.

Every worker under ``elastic-resume launch`` keeps one 32-byte record in a file of its own
(``ER_HEARTBEAT_DIR``/``rank-<local rank>``): the step it finished last, the section it is in
(step, data, save, restore, rollback), when it last made progress and when the section began.
The launcher reads the records once per monitor interval and declares a rank hung when it makes
no progress for longer than its hang timeout (``launcher/hangs.py``). Writing a record is one
``pwrite`` of 32 bytes into the page cache: no collective, no lock shared with other processes,
nothing per step beyond that. Outside the launcher (no ``ER_HEARTBEAT_DIR``) every call here does
nothing.

Who beats: ``SpikeGuard.step`` and ``CheckpointManager.save_if_preempted`` (one per step), a
save or restore (section ``save``/``restore``, which get a longer timeout: a big checkpoint is no
hang), a rollback, ``ResumableDataLoader`` while it fetches a batch (``data``). A loop that calls
none of them can beat itself: ``heartbeat.beat(step)``.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple

from .contract import Env, StrEnum


class Section(StrEnum):
    STEP = "step"  #: training (the default between beats)
    DATA = "data"  #: fetching a batch
    SAVE = "save"  #: a checkpoint's foreground part (blocking, or the staging copy of an async save)
    RESTORE = "restore"
    ROLLBACK = "rollback"
    #: Training is over (the manager or the Lightning plugin was closed): what the script does
    #: after it (an evaluation, writing results) is not watched.
    FINISHED = "finished"
    #: This worker's node is to leave the job (a straggler excluded): its launcher must not
    #: restart it, and must not close the rendezvous the other nodes go on with.
    LEAVING = "leaving"


#: Sections that may take much longer than a step without being a hang.
SLOW_SECTIONS = frozenset({Section.SAVE, Section.RESTORE, Section.ROLLBACK})
_CODES = list(Section)
RECORD = struct.Struct("<qqdd")  # step (-1: none yet), section, last progress, section start (monotonic)


class Beat(NamedTuple):
    step: int | None
    section: Section
    at: float  #: time.monotonic() of the last progress (system-wide on Linux: the launcher compares)
    section_since: float


def encode(beat: Beat) -> bytes:
    return RECORD.pack(-1 if beat.step is None else beat.step, _CODES.index(beat.section), beat.at, beat.section_since)


def decode(data: bytes) -> Beat | None:
    """A record, or None for a short, torn or foreign one (the reader tries again next time)."""
    if len(data) != RECORD.size:
        return None
    step, code, at, since = RECORD.unpack(data)
    if not 0 <= code < len(_CODES) or step < -1 or not (at == at and since == since):
        return None
    return Beat(None if step < 0 else step, _CODES[code], at, since)


def record_path(directory: str, local_rank: int) -> str:
    return os.path.join(directory, f"rank-{local_rank}")


class _Writer:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        self.step: int | None = None
        self.section = Section.STEP
        self.since = time.monotonic()
        self.lock = threading.Lock()

    def write(self) -> None:
        with self.lock:
            try:
                os.pwrite(self.fd, encode(Beat(self.step, self.section, time.monotonic(), self.since)), 0)
            except OSError:
                pass  # the launcher's directory went away (it is ending): nothing to report to


_writer: _Writer | None = None
_resolved = False
_resolve_lock = threading.Lock()


def _get() -> _Writer | None:
    global _writer, _resolved
    if _resolved:
        return _writer
    with _resolve_lock:
        if not _resolved:
            directory, local_rank = os.environ.get(Env.HEARTBEAT_DIR), os.environ.get("LOCAL_RANK")
            if directory and local_rank and local_rank.isdigit() and os.path.isdir(directory):
                try:
                    _writer = _Writer(record_path(directory, int(local_rank)))
                except OSError:
                    _writer = None
            _resolved = True
    return _writer


def beat(step: int | None = None) -> None:
    """Progress: ``step`` finished (or, without a step, still moving in the current section,
    e.g. once per batch of an evaluation pass in a plain loop)."""
    w = _get()
    if w is None:
        return
    if step is not None:
        w.step = step
        if w.section == Section.FINISHED:  # training again after a close
            w.section, w.since = Section.STEP, time.monotonic()
    w.write()


def finished() -> None:
    """Training is over: stop being watched (called by ``CheckpointManager.close`` and the
    Lightning plugin's teardown)."""
    w = _get()
    if w is None or threading.current_thread() is not threading.main_thread():
        return
    w.section, w.since = Section.FINISHED, time.monotonic()
    w.write()


def leave() -> None:
    """Ask this worker's launcher to take its node out of the job once the workers exit."""
    w = _get()
    if w is None:
        return
    w.section, w.since = Section.LEAVING, time.monotonic()
    w.write()


def read(directory: str, local_rank: int) -> Beat | None:
    """A worker's last record (None: none yet, or torn)."""
    try:
        with open(record_path(directory, local_rank), "rb") as f:
            return decode(f.read(RECORD.size + 1))
    except OSError:
        return None


@contextlib.contextmanager
def section(name: Section | str) -> Iterator[None]:
    """Mark the code inside as ``name`` (nested sections restore the outer one after)."""
    w = _get()
    if w is None or threading.current_thread() is not threading.main_thread():
        yield  # a background save's thread does not speak for the training loop
        return
    outer = w.section
    w.section, w.since = Section(name), time.monotonic()
    w.write()
    try:
        yield
    finally:
        w.section, w.since = outer, time.monotonic()
        w.write()


def _reset_for_tests() -> None:
    global _writer, _resolved
    _writer, _resolved = None, False
