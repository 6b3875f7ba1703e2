"""Launcher side of hang detection: read each local worker's progress record
(:mod:`elastic_resume.heartbeat`) once per monitor interval, declare a rank hung when it made no
progress for longer than the hang timeout, and keep every worker's Python stack.

The timeout is ``--er-hang-timeout`` seconds, or learned (``auto``): 20 times the median step
time seen so far, at least 60 s, and 300 s until three steps were seen (imports, compilation and
the first restore come before any of that). While a worker is in a save, restore or rollback
(sections that may take far longer than a step: a big checkpoint is no hang), or has not finished
its first step yet, the limit is ten times longer. A worker that has not beaten once (a script that never calls the guard, the
manager's step hooks or ``heartbeat.beat``) is not watched.

When ranks hang together (one stopped, the others blocked in its collective) every one of them
stops beating; the suspect named first is a stopped process (state ``T``) if there is one, else
the rank with the lowest step, then one in a section other than the plain step (fetching data,
saving: the others wait for it in a collective), then the oldest progress. Stacks come from ``py-spy dump`` where
py-spy is installed (it reads a stopped process too), else from the worker's own ``faulthandler``
on SIGUSR2 (registered by the worker wrapper; it runs even while the main thread is blocked in C,
but not in a stopped process).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..heartbeat import SLOW_SECTIONS, Beat, Section, read

FLOOR_S = 60.0
STARTUP_S = 300.0
STEP_FACTOR = 20.0
SLOW_FACTOR = 10.0


def stack_path(directory: str, local_rank: int) -> str:
    """Where a worker's faulthandler writes its stack on SIGUSR2."""
    return os.path.join(directory, f"stack-{local_rank}.txt")


@dataclass(frozen=True)
class Hung:
    local_rank: int
    rank: int
    pid: int
    step: int | None
    section: Section
    seconds: float  #: without progress
    limit_s: float
    process_state: str  #: from /proc: "running", "sleeping", "stopped (SIGSTOP)", ...


@dataclass
class HangWatch:
    directory: str
    timeout_s: float | None = None  #: None: learned from the step times
    _last: dict[int, Beat] = field(default_factory=dict)
    _intervals: deque[float] = field(default_factory=lambda: deque(maxlen=64))

    def reset(self) -> None:
        """Before a new generation of workers starts: forget the old one's records (what was
        learned stays; each worker truncates its own stack file)."""
        self._last.clear()
        for name in os.listdir(self.directory):
            if name.startswith("rank-"):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass

    def limit(self, section: Section, started: bool = True) -> float:
        """The seconds without progress allowed in ``section``; ``started``: a step has finished
        (before that, the first step's compilation and warm-up get a slow section's limit)."""
        if self.timeout_s is not None:
            base = self.timeout_s
        elif len(self._intervals) < 3:
            base = STARTUP_S
        else:
            base = max(FLOOR_S, STEP_FACTOR * statistics.median(self._intervals))
        return base * (SLOW_FACTOR if section in SLOW_SECTIONS or not started else 1.0)

    def _read(self, local_rank: int) -> Beat | None:
        beat = read(self.directory, local_rank)
        if beat is None:  # none yet, or torn while being rewritten: keep the last good one
            return self._last.get(local_rank)
        before = self._last.get(local_rank)
        if before is not None and beat.step is not None and before.step is not None and beat.step > before.step:
            self._intervals.append((beat.at - before.at) / (beat.step - before.step))
        self._last[local_rank] = beat
        return beat

    def check(self, workers: dict[int, tuple[int, int]], now: float | None = None) -> list[Hung]:
        """``workers``: local rank -> (global rank, pid). The ranks without progress for longer
        than their limit, the suspect first; empty when all move."""
        now = time.monotonic() if now is None else now
        hung = []
        for local_rank, (rank, pid) in sorted(workers.items()):
            beat = self._read(local_rank)
            if beat is None or beat.section in (Section.FINISHED, Section.LEAVING):
                continue
            idle, limit = now - beat.at, self.limit(beat.section, started=beat.step is not None)
            if idle > limit:
                hung.append(Hung(local_rank, rank, pid, beat.step, beat.section, round(idle, 1), round(limit, 1),
                                 process_state(pid)))
        # At the same step, a rank in the plain step section is most likely blocked in a collective
        # waiting for the one that is somewhere specific (fetching data, saving).
        return sorted(hung, key=lambda h: (not h.process_state.startswith("stopped"), -1 if h.step is None else h.step,
                                           h.section == Section.STEP, -h.seconds))


_STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O (D)", "T": "stopped (SIGSTOP)",
           "t": "stopped by a debugger", "Z": "a zombie"}


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return _STATES.get(stat.rsplit(")", 1)[1].split()[0], "unknown")
    except (OSError, IndexError):
        return "unknown"


def py_spy() -> str | None:
    """py-spy from PATH or beside this interpreter (a virtual environment's bin)."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))


def dump_stacks(workers: dict[int, tuple[int, int]], heartbeat_dir: str, out_dir: str) -> dict[int, str]:
    """Every local worker's stack into ``out_dir/rank-<rank>.txt``; returns rank -> how it was
    read (or why not)."""
    os.makedirs(out_dir, exist_ok=True)
    spy = py_spy()
    how: dict[int, str] = {}
    waiting = []
    for local_rank, (rank, pid) in sorted(workers.items()):
        text = None
        if spy is not None:
            try:
                # py-spy pauses a running process to read a consistent stack; a stopped one cannot be
                # paused again, so its memory is read as it stands.
                nonblocking = ["--nonblocking"] if process_state(pid).startswith("stopped") else []
                r = subprocess.run([spy, "dump", *nonblocking, "--pid", str(pid)], capture_output=True, text=True,
                                   timeout=20)
                if r.returncode == 0 and r.stdout.strip():
                    text, how[rank] = r.stdout, "py-spy"
            except (OSError, subprocess.TimeoutExpired):
                pass
        if text is None and os.path.exists(stack_path(heartbeat_dir, local_rank)):
            if process_state(pid).startswith("stopped"):
                how[rank] = "none: the process is stopped and py-spy is not installed (pip install py-spy)"
                continue
            try:
                os.kill(pid, signal.SIGUSR2)  # the worker's faulthandler writes its threads' stacks
                waiting.append((local_rank, rank))
            except ProcessLookupError:
                how[rank] = "none: the process is gone"
            continue
        if text is not None:
            _write(out_dir, rank, text)
        elif rank not in how:
            how[rank] = "none: py-spy is not installed and the worker has no faulthandler (not a Python worker?)"
    deadline = time.monotonic() + 3.0
    for local_rank, rank in waiting:
        path = stack_path(heartbeat_dir, local_rank)
        while time.monotonic() < deadline and not _complete(path):
            time.sleep(0.05)
        time.sleep(0.2)  # faulthandler writes thread by thread
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            text = ""
        if text.strip():
            _write(out_dir, rank, text)
            how[rank] = "faulthandler"
        else:
            how[rank] = "none: the worker did not answer SIGUSR2 within 3 s"
    return how


def _complete(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


def _write(out_dir: str, rank: int, text: str) -> None:
    with open(os.path.join(out_dir, f"rank-{rank}.txt"), "w") as f:
        f.write(text)


class AgentWatch:
    """The launcher's own agent loop, watched from a thread of its own.

    torch's agent asks the rendezvous store, on every monitor pass, whether nodes wait to join.
    When the store's host is cut off (a partition that sends no RST: the connection stays open
    and packets vanish) that call blocks for minutes, and with it every check this launcher makes
    of its workers: the hang watch above never runs. A thread sees the loop stop coming back:
    once it has not for ``limit()`` seconds while the workers run, ``on_stuck(seconds)`` is called
    (from this thread) to take the node out of the job."""

    def __init__(self, limit: Callable[[], float], on_stuck: Callable[[float], None], interval_s: float = 0.5) -> None:
        self.limit = limit
        self.on_stuck = on_stuck
        self.interval_s = interval_s
        self._last: float | None = None  # None: not watched (rendezvous, restarts, the end)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="elastic-resume-agent-watch", daemon=True)
        self._thread.start()

    def tick(self) -> None:
        """The loop came back (a monitor pass); watching starts with the first."""
        with self._lock:
            self._last = time.monotonic()

    def pause(self) -> None:
        """Not watched until the next tick: the agent re-forms the group (a rendezvous may wait
        for nodes as long as its join timeout says) or is done."""
        with self._lock:
            self._last = None

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            with self._lock:
                last = self._last
            if last is not None and time.monotonic() - last > self.limit():
                self.on_stuck(round(time.monotonic() - last, 1))
                return
