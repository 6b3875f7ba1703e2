"""Structured events: one JSON object per line, appended to a log file, mirrored to ``logging``.

Everything that matters for understanding a run after the fact (saves, commits, restores,
fallbacks, corruption found, prunes; later votes, rollbacks, restarts) is emitted here. The file
is the interface between the workers, the launcher and ``elastic-resume report``: several
processes append to the same file, so each event is written with a single ``write`` on an
``O_APPEND`` descriptor, which keeps lines whole on local file systems.
"""

from __future__ import annotations

import enum
import glob
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from .contract import WARNING_EVENTS, Env, Event
from .errors import ConfigError

logger = logging.getLogger("elastic_resume")


def jsonable(value: Any) -> Any:
    """Make a field JSON-safe without losing what it says (non-finite floats become strings,
    enums their value)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class EventLog:
    """Appends structured events to ``path`` (if given) and logs them at INFO (WARNING for
    events whose name says something went wrong)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, rank: int | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.rank = rank
        self._lock = threading.Lock()
        self._failed = False
        if self.path is not None:
            parent = os.path.dirname(os.path.abspath(self.path))
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                self._give_up(e)

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (Lightning's ddp_spawn, deepcopy of callbacks, torch.save(trainer)): the lock
        # is the one thing that cannot travel; a copy gets a lock of its own.
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, *, rank: int | None = None) -> EventLog:
        return cls(os.environ.get(Env.EVENT_LOG) or None, rank=rank)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = self._record(event, fields)
        level = logging.WARNING if event in WARNING_EVENTS else logging.INFO
        if logger.isEnabledFor(level):
            details = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("ts", "event"))
            logger.log(level, "%s %s", event, details)
        self._append(record)
        return record

    def record(self, event: str, **fields: Any) -> None:
        """Append to the file only, without logging: for high-rate events (one per training
        step) that feed ``elastic-resume report`` but would flood a console."""
        if self.path is not None:
            self._append(self._record(event, fields))

    def _record(self, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {"ts": round(time.time(), 6), "event": str(event)}
        if self.rank is not None:
            record["rank"] = self.rank
        record.update({k: jsonable(v) for k, v in fields.items()})
        return record

    def _append(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = (json.dumps(record, sort_keys=False) + "\n").encode()
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            except OSError as e:
                self._give_up(e)

    def _give_up(self, error: OSError) -> None:
        """Logging is best effort: a log that cannot be written (disk full, read-only, gone)
        costs one warning, never a failed save or restore. Later events still go to
        ``logging``; appending is retried, but warned about only once."""
        if not self._failed:
            self._failed = True
            logger.warning("event log %s cannot be written (%s); events go to the log output only",
                           self.path, error.strerror or error)


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read an event log; a torn last line (the writer was killed mid-write) is skipped."""
    events = []
    # errors="replace": a line mangled by a foreign writer or bad media is skipped below, like
    # a torn one, instead of failing the whole report.
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            if isinstance(event, dict):
                events.append(event)
    return events


#: Key added to each loaded event: the run id of the launch whose ``launch_started`` precedes it
#: in its file (None before any). One file may hold several launches (an ``--er-event-log``
#: reused), and a directory several runs.
RUN = "_run"


def is_number(v: Any) -> TypeGuard[int | float]:
    """A finite int or float from untrusted JSON (not a bool, NaN or infinity)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_event(e: dict[str, Any]) -> bool:
    return isinstance(e.get("event"), str) and is_number(e.get("ts"))


@dataclass
class Logs:
    """What :func:`load_events` found: the events, by time, and the files it passed over."""

    events: list[dict[str, Any]]
    not_event_logs: list[str]  #: ``*.jsonl`` files with no event line (loss logs, other data)

    @property
    def runs(self) -> dict[str, tuple[float, float]]:
        """Run id -> (first, last) time of its events."""
        out: dict[str, tuple[float, float]] = {}
        for e in self.events:
            run, ts = e.get(RUN), e.get("ts")
            if isinstance(run, str) and is_number(ts):
                first, last = out.get(run, (float(ts), float(ts)))
                out[run] = (min(first, ts), max(last, ts))
        return out

    def of_run(self, run_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get(RUN) == run_id]


def load_events(paths: Sequence[str]) -> Logs:
    """Every event from the given files and directories (``*.jsonl`` below them), by time, each
    tagged with its run (:data:`RUN`). A file none of whose lines is an event (a loss log beside
    the event logs) is passed over and named, never read as one."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "**", "*.jsonl"), recursive=True))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ConfigError(f"event log {p!r} not found")
    events: list[dict[str, Any]] = []
    passed_over: list[str] = []
    for f in files:
        try:
            lines = read_events(f)
        except OSError as err:
            raise ConfigError(f"event log {f!r} cannot be read: {err.strerror or err}") from None
        if lines and not any(_is_event(line) for line in lines):
            passed_over.append(f)
            continue
        run = None
        for line in lines:
            if line.get("event") == Event.LAUNCH_STARTED and isinstance(line.get("run_id"), str):
                run = line["run_id"]
            line[RUN] = run
        events += lines
    events.sort(key=lambda e: e["ts"] if is_number(e.get("ts")) else 0.0)
    return Logs(events, passed_over)
