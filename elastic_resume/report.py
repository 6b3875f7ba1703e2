"""``elastic-resume report``: what happened in a run, from its JSONL event files.

The launcher writes one file per node; the workers append to it (saves, restores, votes,
rollbacks, and one ``step`` line per training step from rank 0). From those lines this module
works out the loss curve that survived (a step done again after a restart or a rollback replaces
the earlier one, which was work thrown away), the restarts with their cause and the time to the
first step after them, rollbacks and skipped data, preemptions, checkpoints, and goodput:
useful step time (the surviving steps' durations) divided by wall time (the union of the
launcher sessions), and divided by the elapsed time, which adds the waits between sessions (a
requeued Slurm job waits in the queue; ``sacct`` shows only its last run).

Pure functions over event dictionaries, except :func:`load_events` (reads files) and
:func:`plot` (writes a PNG with matplotlib, the ``report`` extra).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .contract import Event, ExitCode
from .errors import ConfigError
from .events import RUN, Logs, is_int, is_number, load_events

__all__ = ["RUN", "Logs", "load_events", "plot", "summarize", "well_formed"]

_INT_FIELDS = ("step", "rank", "from_step", "to_step", "through_step", "bytes", "exit_code", "generation")
_NUMBER_FIELDS = ("loss", "seconds", "lr_scale", "recover_s")
_SCALAR_FIELDS = ("node", "pid", "attempt", "signal", "reason", "cause")  # compared and used as keys


def well_formed(e: dict[str, Any]) -> bool:
    """Whether an event line has the types the report reads (valid JSON is not enough: a line
    from another writer, or a damaged one, may say ``"ts": "x"`` or ``"step": null``). A line
    that does not is skipped and counted, as torn lines are."""
    ts = e.get("ts")
    if not is_number(ts) or not isinstance(e.get("event"), str):
        return False
    if e["event"] == Event.STEP and not is_int(e.get("step")):
        return False
    if any(k in e and e[k] is not None and not is_int(e[k]) for k in _INT_FIELDS):
        return False
    if any(k in e and e[k] is not None and (not isinstance(e[k], (int, float)) or isinstance(e[k], bool))
           for k in _NUMBER_FIELDS):
        return False
    if any(k in e and isinstance(e[k], (dict, list)) for k in _SCALAR_FIELDS):
        return False
    failures = e.get("failures")
    if failures is not None and not (isinstance(failures, list) and all(
            isinstance(f, dict) and is_int(f.get("rank")) and (f.get("signal") is None or isinstance(f["signal"], str))
            and (f.get("exitcode") is None or is_int(f["exitcode"])) for f in failures)):
        return False
    skipped = e.get("skipped")
    return e["event"] != Event.ROLLBACK or skipped is None or (
        isinstance(skipped, list) and len(skipped) == 2 and all(is_int(v) for v in skipped))


def _rank0(e: dict[str, Any]) -> bool:
    return e.get("rank") in (0, None)


@dataclass
class Summary:
    wall_s: float = 0.0  #: time some launcher of the run was up (the union of the sessions)
    sessions: int = 0
    #: Gaps between sessions, when nothing of the job ran: {ts, seconds, after, scheduler_restart}.
    waits: list[dict[str, Any]] = field(default_factory=list)
    useful_s: float = 0.0
    steps_final: int = 0
    steps_executed: int = 0
    last_step: int | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) that survived
    abandoned: list[list[tuple[int, float]]] = field(default_factory=list)  # thrown-away segments
    #: The loss the guard judged (the mean over the ranks), where the vote brought it: the kept
    #: steps', and the thrown-away steps' (a spike's step is among those: it was rolled back).
    judged_curve: list[tuple[int, float]] = field(default_factory=list)
    judged_abandoned: list[tuple[int, float]] = field(default_factory=list)
    ranks: int | None = None  #: how many ranks the judged loss is the mean over
    restarts: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    preemptions: list[dict[str, Any]] = field(default_factory=list)
    #: After restarts, steps trained again against what they gave before: replay_verified and
    #: replay_mismatch events' fields, with "event".
    replays: list[dict[str, Any]] = field(default_factory=list)
    hangs: list[dict[str, Any]] = field(default_factory=list)  #: hang_detected: who, where, how long, stacks
    divergences: list[dict[str, Any]] = field(default_factory=list)  #: replica_divergence: step, odd ranks, parameters
    stragglers: list[dict[str, Any]] = field(default_factory=list)  #: straggler_detected: rank, host, ratio
    excluded: list[dict[str, Any]] = field(default_factory=list)  #: node_excluded: the node that left the job
    saves: int = 0
    save_bytes: int = 0
    save_seconds: list[float] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)
    exits: list[dict[str, Any]] = field(default_factory=list)
    malformed: int = 0  #: event lines skipped: valid JSON, but not the types an event has

    @property
    def goodput(self) -> float | None:
        return self.useful_s / self.wall_s if self.wall_s > 0 and self.steps_final else None

    @property
    def lost_s(self) -> float:
        return max(0.0, self.wall_s - self.useful_s)

    @property
    def waiting_s(self) -> float:
        return sum(w["seconds"] for w in self.waits)

    @property
    def elapsed_s(self) -> float:
        """First launch to last event: what the user waited for, queue time included."""
        return self.wall_s + self.waiting_s

    @property
    def goodput_elapsed(self) -> float | None:
        return self.useful_s / self.elapsed_s if self.elapsed_s > 0 and self.steps_final else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3), "useful_s": round(self.useful_s, 3), "lost_s": round(self.lost_s, 3),
            "goodput": None if self.goodput is None else round(self.goodput, 4), "sessions": self.sessions,
            "waits": self.waits, "waiting_s": round(self.waiting_s, 3), "elapsed_s": round(self.elapsed_s, 3),
            "goodput_elapsed": None if self.goodput_elapsed is None else round(self.goodput_elapsed, 4),
            "steps_final": self.steps_final, "steps_executed": self.steps_executed, "last_step": self.last_step,
            "restarts": self.restarts, "rollbacks": self.rollbacks, "preemptions": self.preemptions,
            "replays": self.replays, "hangs": self.hangs, "divergences": self.divergences,
            "stragglers": self.stragglers, "excluded": self.excluded,
            "checkpoints": {"committed": self.saves, "bytes": self.save_bytes,
                            "median_seconds": round(statistics.median(self.save_seconds), 4) if self.save_seconds else None},
            "problems": self.problems, "exits": self.exits, "malformed_lines": self.malformed,
        }

    def text(self) -> str:
        lines = [f"elastic-resume run summary ({self.sessions} launcher session{'s' * (self.sessions != 1)})"]

        def row(key: str, value: str) -> None:
            lines.append(f"  {key:<18} {value}")

        row("wall time", f"{self.wall_s:.1f} s" + (" with a launcher up" if self.waits else ""))
        if self.waits:
            row("between sessions", f"{self.waiting_s:.1f} s in {len(self.waits)} wait(s) with nothing running "
                                    "(queued after a requeue, rescheduled, resubmitted)")
            for w in self.waits:
                again = (f", back as scheduler restart {w['scheduler_restart']}"
                         if w.get("scheduler_restart") not in (None, 0) else "")
                row("", f"{w['seconds']:.1f} s from {w['ts']}, after the job {w['after']}{again}")
            row("elapsed", f"{self.elapsed_s:.1f} s from the first launch to the end")
        if self.malformed:
            row("skipped lines", f"{self.malformed} event line(s) without the fields' types (not written by elastic-resume?)")
        if self.steps_final:
            row("steps", f"{self.steps_final} kept (up to step {self.last_step}), {self.steps_executed} executed")
            row("goodput", f"{100 * (self.goodput or 0):.1f}% ({self.useful_s:.1f} s of useful step time, "
                           f"{self.lost_s:.1f} s lost)" + (
                               f"; {100 * (self.goodput_elapsed or 0):.1f}% of the elapsed time" if self.waits else ""))
        else:
            row("steps", "no step lines in these logs (SpikeGuard on rank 0 records them, in rank 0's node log)")
        row("restarts", str(len(self.restarts)) if self.restarts else "none")
        for r in self.restarts:
            rec = f", first step {r['recover_s']:.1f} s after the failure" if r.get("recover_s") is not None else ""
            resumed = f" -> resumed from step {r['resumed_from']}" if r.get("resumed_from") is not None else ""
            row("", f"{r['cause']}{resumed}{rec}")
        if self.replays:
            bad = [r for r in self.replays if r["event"] == Event.REPLAY_MISMATCH]
            row("replays", f"{len(self.replays) - len(bad)} verified, {len(bad)} mismatched (steps trained again "
                           "after a restart, against what they gave before, bit for bit)")
            for r in self.replays:
                if r["event"] == Event.REPLAY_VERIFIED:
                    row("", f"steps {r.get('from_step')}-{r.get('to_step')} after step {r.get('resumed_from')}: "
                            f"{r.get('steps')} of {r.get('of')} matched ({r.get('compared')})")
                else:
                    row("", f"MISMATCH at step {r.get('step')} after step {r.get('resumed_from')}: {r.get('what')} "
                            f"{r.get('recorded')} before, {r.get('replayed')} now ({r.get('matched_before')} matched first)")
        if self.hangs:
            row("hangs", str(len(self.hangs)))
            for h in self.hangs:
                row("", f"rank {h.get('rank')} on {h.get('host')}: no progress for {h.get('seconds')} s in its "
                        f"{h.get('section')} section after step {h.get('step')}; stacks in {h.get('stacks')}")
        if self.divergences:
            row("replicas", f"{len(self.divergences)} divergence{'s' if len(self.divergences) > 1 else ''} "
                            "(ranks whose copies of the DDP parameters differ)")
            for d in self.divergences:
                ranks = ", ".join(map(str, d.get("ranks") or []))
                row("", f"step {d.get('step')}, found by the {d.get('found_by')}: rank {ranks}, in "
                        f"{', '.join(d.get('parameters') or []) or 'the combined digest'}")
        if self.stragglers:
            row("stragglers", f"{len(self.stragglers)} (busy time per step against the other ranks' mean)")
            for st in self.stragglers:
                row("", f"rank {st.get('straggler')} on {st.get('host')}: {st.get('ratio')}x ({st.get('busy_s')} s "
                        f"against {st.get('others_s')} s) at step {st.get('step')}")
        for x in self.excluded:
            row("excluded", f"node {x.get('node')} left the job (a persistent straggler)")
        row("rollbacks", str(len(self.rollbacks)) if self.rollbacks else "none")
        for r in self.rollbacks:
            skipped = f", skipped samples {r['skipped'][0]}-{r['skipped'][1]}" if r.get("skipped") else ""
            why = "replica divergence" if r.get("cause") == "replica_divergence" else "spike"
            row("", f"{why} at step {r['from_step']} -> back to step {r['to_step']}{skipped}")
        row("preemptions", str(len(self.preemptions)) if self.preemptions else "none")
        for p in self.preemptions:
            row("", f"{p['signal']} -> " + (f"saved step {p['saved_step']}" if p.get("saved_step") is not None
                                             else "no save"))
        med = f", median {statistics.median(self.save_seconds):.2f} s" if self.save_seconds else ""
        row("checkpoints", f"{self.saves} committed ({self.save_bytes / 2**20:.1f} MiB){med}")
        row("problems", "none" if not self.problems else "")
        for p in self.problems:
            row("", f"{p['event']}: " + ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("event", "ts")))
        if self.exits:
            row("exit", "; ".join(f"{e['exit_code']} ({e['reason']})" for e in self.exits[-1:]))
        return "\n".join(lines)


_PROBLEMS = (Event.CORRUPTION_FOUND, Event.RESTORE_FALLBACK, Event.RESUME_CRASH_LOOP, Event.GAVE_UP, Event.SAVE_FAILED,
             Event.LAUNCH_ERROR, Event.PREEMPTION_GRACE_EXPIRED, Event.REQUEUE_FAILED, Event.DRIFT_FOUND,
             Event.RENDEZVOUS_LOST)


@dataclass
class _Session:
    """One launcher process's stretch of the run: from its ``launch_started`` to the last event
    before the next session (its workers' last lines come after the launcher's own)."""

    start: float
    end: float
    exit_code: Any = None  #: from its ``launch_finished``; None when it never wrote one (killed)
    scheduler_restarts: Any = None


def _why_ended(codes: list[Any]) -> str:
    names = {0: "finished", ExitCode.PREEMPTED: "preempted", ExitCode.GAVE_UP: "gave up",
             ExitCode.PERMANENT: "a permanent error"}
    if ExitCode.PREEMPTED in codes:  # one node's 75 with another's 143: the job was preempted
        return "preempted"
    known = [c for c in codes if c is not None]
    if not known:
        return "ended without a launch_finished line (the node or launcher was killed)"
    return ", ".join(dict.fromkeys(names.get(c, f"exit {c}") for c in known))


def _sessions(events: list[dict[str, Any]]) -> list[_Session]:
    by_launcher: dict[tuple[Any, Any], _Session] = {}
    for e in events:
        where = (e.get("node"), e.get("pid"))
        if e.get("event") == Event.LAUNCH_STARTED:
            by_launcher[where] = _Session(e["ts"], e["ts"], scheduler_restarts=e.get("scheduler_restarts"))
        elif where in by_launcher:
            by_launcher[where].end = e["ts"]
            if e.get("event") == Event.LAUNCH_FINISHED:
                by_launcher[where].exit_code = e.get("exit_code")
    spans = sorted(by_launcher.values(), key=lambda x: (x.start, x.end))
    starts = [x.start for x in spans] + [float("inf")]
    for i, span in enumerate(spans):
        later = [e["ts"] for e in events if span.start <= e["ts"] < starts[i + 1]]
        span.end = max(span.end, max(later, default=span.end))
    return spans


def _wall(events: list[dict[str, Any]]) -> tuple[float, int, list[dict[str, Any]]]:
    """(wall time, sessions, waits): the union of the launcher sessions' intervals (first to last
    event without a launcher), and the gaps in that union. A gap is time the job was not running
    at all: queued after a requeue, a pod being rescheduled, a resubmission."""
    spans = _sessions(events)
    if not spans:
        ts = [e["ts"] for e in events if "ts" in e]
        return ((max(ts) - min(ts)) if ts else 0.0), 0, []
    total, waits = 0.0, []
    cur_start, cur_end = spans[0].start, spans[0].end
    ended: list[Any] = [spans[0].exit_code]
    for span in spans[1:]:
        if span.start > cur_end:
            total += cur_end - cur_start
            waits.append({"ts": cur_end, "seconds": round(span.start - cur_end, 3), "after": _why_ended(ended),
                          "scheduler_restart": span.scheduler_restarts})
            cur_start, cur_end, ended = span.start, span.end, []
        else:
            cur_end = max(cur_end, span.end)
        ended.append(span.exit_code)
    total += cur_end - cur_start
    return total, len(spans), waits


def _cause(failures: list[dict[str, Any]] | None) -> str:
    if not failures:
        return "membership change (a node joined or left)"
    # When one worker dies, the agent stops the others with SIGTERM: those are consequences.
    root = [f for f in failures if f.get("signal") != "SIGTERM"] or failures
    parts = []
    for f in root:
        how = (f"hung in its {f['hang']} section" if f.get("hang") else
               f"killed by {f['signal']}" if f.get("signal") else f"exit {f['exitcode']}")
        parts.append(f"rank {f['rank']} {how}")
    stopped = len(failures) - len(root)
    return ", ".join(parts) + (f" ({stopped} other worker{'s' * (stopped > 1)} stopped by the agent)" if stopped else "")


def summarize(events: Iterable[dict[str, Any]]) -> Summary:
    given = list(events)
    events = sorted((e for e in given if well_formed(e)), key=lambda e: e["ts"])
    s = Summary()
    s.malformed = len(given) - len(events)
    s.wall_s, s.sessions, s.waits = _wall(events)
    timeline: dict[int, tuple[float, float | None]] = {}  # step -> (loss, seconds)
    order: list[int] = []  # the timeline's steps, increasing (a stack: redone steps pop the tail)
    abandoned: list[list[tuple[int, float]]] = []
    judged: dict[int, float] = {}  # step of the timeline -> the judged loss
    failed_at: float | None = None
    pending_restarts: list[dict[str, Any]] = []
    last_restart_ts = -1e18
    incident: set[tuple[Any, Any, Any]] = set()  # the launchers that restarted for the current incident
    commits: set[tuple[Any, Any]] = set()
    for e in events:
        kind = e.get("event")
        if kind == Event.STEP and _rank0(e):
            step = int(e["step"])
            s.steps_executed += 1
            # Keys stay in increasing order (a step is only added once every later one is gone),
            # so what a redone step throws away is a tail: O(1) per step on a normal run.
            dropped: list[tuple[int, float]] = []
            while order and order[-1] >= step:
                last = order.pop()
                dropped.append((last, timeline.pop(last)[0]))
                if last in judged:
                    s.judged_abandoned.append((last, judged.pop(last)))
            if dropped:
                abandoned.append(dropped[::-1])
            order.append(step)
            loss = e.get("loss")
            timeline[step] = (float(loss) if isinstance(loss, (int, float)) else float("nan"), e.get("seconds"))
            for r in pending_restarts:
                if r.get("recover_s") is None and r.get("_failed_ts") is not None:
                    r["recover_s"] = round(e["ts"] - r["_failed_ts"], 3)
            pending_restarts = []
        elif kind == Event.LOSS_JUDGED and _rank0(e):
            # Its step's own line came first (the vote reports a step after it), and a redo of
            # the step only after it (a rollback acts on the vote): it belongs to that step.
            loss, judged_step = e.get("loss"), e.get("step")
            if judged_step in timeline and isinstance(loss, (int, float)) and not isinstance(loss, bool):
                judged[judged_step] = float(loss)
                if is_int(e.get("ranks")):
                    s.ranks = e["ranks"]
        elif kind == Event.WORKERS_FAILED:
            failed_at = e["ts"] if failed_at is None else failed_at
        elif kind == Event.RESTART:
            # Every node's agent restarts for the same incident; count it once. A node that
            # restarts again is a new incident, however soon (quick crash loops are not one).
            where = (e.get(RUN), e.get("node"), e.get("pid"))
            if e["ts"] - last_restart_ts > 15.0 or where in incident:
                incident = set()
                r = {"ts": e["ts"], "node": e.get("node"), "cause": _cause(e.get("failures")),
                     "_failed_ts": failed_at or e["ts"], "recover_s": None, "resumed_from": None}
                s.restarts.append(r)
                pending_restarts.append(r)
            incident.add(where)
            last_restart_ts = e["ts"]
            failed_at = None
        elif kind in (Event.RESTORED, Event.RESTORE_NONE) and _rank0(e) and pending_restarts:
            pending_restarts[-1]["resumed_from"] = e.get("step", 0) if kind == Event.RESTORED else 0
        elif kind in (Event.REPLAY_VERIFIED, Event.REPLAY_MISMATCH) and _rank0(e):
            s.replays.append({k: v for k, v in e.items() if k not in ("ts", "pid", "rank", "reason", RUN)})
        elif kind == Event.HANG_DETECTED:
            s.hangs.append({k: e.get(k) for k in ("rank", "host", "section", "step", "seconds", "process_state",
                                                  "stacks")})
        elif kind == Event.STRAGGLER_DETECTED:
            s.stragglers.append({k: e.get(k) for k in ("step", "straggler", "host", "ratio", "busy_s", "others_s")})
        elif kind == Event.NODE_EXCLUDED:
            s.excluded.append({"node": e.get("node"), "ts": e.get("ts")})
        elif kind == Event.REPLICA_DIVERGENCE and _rank0(e):
            s.divergences.append({k: e.get(k) for k in ("step", "ranks", "parameters", "differing", "found_by")})
        elif kind == Event.ROLLBACK and _rank0(e):
            s.rollbacks.append({k: e.get(k) for k in ("from_step", "to_step", "skipped", "steps_lost", "lr_scale",
                                                      "cause")})
        elif kind == Event.PREEMPTION_REQUESTED:
            if not s.preemptions or e["ts"] - s.preemptions[-1]["ts"] > 30.0:
                s.preemptions.append({"ts": e["ts"], "signal": e.get("signal"), "saved_step": None})
        elif kind == Event.PREEMPTION_SAVE and _rank0(e):
            if s.preemptions:
                s.preemptions[-1]["saved_step"] = e.get("step")
            else:
                s.preemptions.append({"ts": e["ts"], "signal": e.get("signal") or "api", "saved_step": e.get("step")})
        elif kind == Event.SAVE_COMMITTED and (e.get("step"), e.get("attempt")) not in commits:
            # Every rank reports the same commit; a node's log may lack rank 0's line.
            commits.add((e.get("step"), e.get("attempt")))
            s.saves += 1
            s.save_bytes += int(e.get("bytes") or 0)
            if isinstance(e.get("seconds"), (int, float)):
                s.save_seconds.append(float(e["seconds"]))
        elif kind in _PROBLEMS and (_rank0(e) or kind in (Event.CORRUPTION_FOUND, Event.SAVE_FAILED)):
            s.problems.append({k: v for k, v in e.items() if k not in ("pid", RUN)})
        elif kind == Event.LAUNCH_FINISHED:
            s.exits.append({"node": e.get("node"), "exit_code": e.get("exit_code"), "reason": e.get("reason")})
    for r in s.restarts:
        r.pop("_failed_ts", None)
        r["ts"] = time.strftime("%H:%M:%S", time.localtime(r["ts"]))
    for p in s.preemptions:
        p["ts"] = time.strftime("%H:%M:%S", time.localtime(p["ts"]))
    for w in s.waits:
        w["ts"] = time.strftime("%H:%M:%S", time.localtime(w["ts"]))
    s.curve = sorted((k, v[0]) for k, v in timeline.items())
    s.judged_curve = sorted(judged.items())
    s.abandoned = abandoned
    s.steps_final = len(timeline)
    s.last_step = max(timeline) if timeline else None
    s.useful_s = sum(sec for _, sec in timeline.values() if isinstance(sec, (int, float)))
    return s


def _mark_unseen_faults(ax: Any, summary: Summary) -> None:
    """What the loss does not show, where it happened: hangs, replicas that differed, and the
    replays after a restart (verified: a green band; a mismatch: a red mark at its step)."""
    for i, h in enumerate(h for h in summary.hangs if is_int(h.get("step"))):
        ax.axvline(h["step"], color="tab:purple", ls=":", lw=1.2,
                   label="hang (no progress; restarted)" if i == 0 else None)
    for i, d in enumerate(d for d in summary.divergences if is_int(d.get("step"))):
        ax.axvline(d["step"], color="tab:purple", ls="-", lw=0.8, alpha=0.6,
                   label=f"replicas differ (rank {', '.join(map(str, d.get('ranks') or []))})" if i == 0 else None)
    for i, st in enumerate(st for st in summary.stragglers if is_int(st.get("step"))):
        ax.axvline(st["step"], color="tab:brown", ls="--", lw=0.8,
                   label=f"straggler (rank {st.get('straggler')}, {st.get('ratio')}x)" if i == 0 else None)
    verified = [r for r in summary.replays if r.get("event") == Event.REPLAY_VERIFIED
                and is_int(r.get("from_step")) and is_int(r.get("to_step"))]
    for i, r in enumerate(verified):
        ax.axvspan(r["from_step"] - 0.5, r["to_step"] + 0.5, color="tab:green", alpha=0.10,
                   label="steps trained again, bit-exact" if i == 0 else None)
    for i, r in enumerate(r for r in summary.replays if r.get("event") == Event.REPLAY_MISMATCH
                          and is_int(r.get("step"))):
        ax.axvline(r["step"], color="tab:red", ls=":", lw=1.5,
                   label="replay mismatch (not deterministic)" if i == 0 else None)


def plot(events: list[dict[str, Any]], summary: Summary, path: str) -> None:
    """Loss curve (kept steps), thrown-away steps in grey, restarts, rollbacks, skipped data.
    ``path`` is a new PNG file, or a regular file it replaces (never a directory or a device)."""
    if os.path.isdir(path) or (os.path.lexists(path) and not os.path.isfile(path)) or path.endswith(os.sep):
        raise ConfigError(f"--plot {path}: not a file to write (a directory or a device stands there)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ConfigError(f"--plot {path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the plot needs matplotlib: pip install 'elastic-resume[report]'") from None
    fig, ax = plt.subplots(figsize=(11.5, 4.8), dpi=110)
    judged = bool(summary.judged_curve)
    # The loss the detectors judged (the mean over the ranks) when the vote recorded it; rank 0's
    # own loss otherwise, and thin beside it. A spike on another rank shows in the first only.
    thrown = dict(summary.judged_abandoned) if judged else {}
    for i, seg in enumerate(summary.abandoned):
        points = [(st, thrown.get(st, v)) for st, v in seg]
        ax.plot([p[0] for p in points], [p[1] for p in points], color="0.7", lw=1,
                label="steps thrown away (redone)" if i == 0 else None)
    if judged:
        ranks = f" over {summary.ranks} ranks" if summary.ranks else ""
        ax.plot([p[0] for p in summary.curve], [p[1] for p in summary.curve], color="tab:blue", lw=0.7, alpha=0.35,
                label="rank 0's loss")
        ax.plot([p[0] for p in summary.judged_curve], [p[1] for p in summary.judged_curve], color="tab:blue", lw=1.5,
                label=f"loss judged (mean{ranks}), kept")
    elif summary.curve:
        ax.plot([p[0] for p in summary.curve], [p[1] for p in summary.curve], color="tab:blue", lw=1.4,
                label="loss (rank 0), kept")
    for i, r in enumerate(summary.restarts):
        if r.get("resumed_from") is not None:
            ax.axvline(r["resumed_from"], color="tab:red", ls="--", lw=1, label="restart (resumed here)" if i == 0 else None)
    skips = [e for e in events if e.get("event") == Event.DATA_SKIPPED and _rank0(e)]
    for i, (rb, sk) in enumerate(zip(summary.rollbacks, skips + [{}] * len(summary.rollbacks))):
        spike = thrown.get(rb["from_step"])
        if spike is None:
            spike = next((v for st, v in reversed([p for seg in summary.abandoned for p in seg]) if st == rb["from_step"]), None)
        if rb.get("cause") == "replica_divergence":
            ax.annotate(f"replicas differ at step {rb['from_step']}", (rb["from_step"], 0.55), fontsize=8,
                        xycoords=("data", "axes fraction"), color="tab:purple")
        elif spike is not None:
            ax.plot([rb["from_step"]], [spike], marker="X", ms=9, color="tab:orange", ls="none",
                    label="spike (rolled back)" if i == 0 else None)
            ax.annotate(f"spike at step {rb['from_step']}: {spike:.3g}", (rb["from_step"], spike), fontsize=8,
                        textcoords="offset points", xytext=(6, -4), color="tab:orange")
        ax.annotate("", xy=(rb["to_step"], 0.5), xytext=(rb["from_step"], 0.5), xycoords=("data", "axes fraction"),
                    arrowprops={"arrowstyle": "->", "color": "tab:orange"})
        through = sk.get("through_step")
        if is_int(through) and through > rb["to_step"]:
            # The samples skipped are those the old timeline trained at steps to+1..through;
            # the redone steps there train on the data that follows.
            ax.axvspan(rb["to_step"] + 0.5, through + 0.5, color="tab:orange", alpha=0.12,
                       label=f"data of steps {rb['to_step'] + 1}-{through} skipped" if i == 0 else None)
    _mark_unseen_faults(ax, summary)
    for i, p in enumerate(summary.preemptions):
        if p.get("saved_step") is not None:
            ax.axvline(p["saved_step"], color="tab:green", ls="-.", lw=1, label="preemption save" if i == 0 else None)
    values = [v for seg in summary.abandoned for _, v in seg] + [v for _, v in summary.curve] + list(thrown.values())
    finite = [v for v in values + [v for _, v in summary.judged_curve] if v == v and abs(v) != float("inf")]
    if finite and max(finite) > 0 and max(finite) / max(min(finite), 1e-12) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    unseen = "".join(f", {len(found)} {what}" for found, what in ((summary.hangs, "hang(s)"),
                                                                   (summary.divergences, "replica divergence(s)"),
                                                                   (summary.stragglers, "straggler(s)"))
                     if found)
    ax.set_title(f"{len(summary.restarts)} restart(s), {len(summary.rollbacks)} rollback(s), "
                 f"{len(summary.preemptions)} preemption(s){unseen}")
    if summary.goodput is not None:
        # An unexplained percentage misleads: say what it divides.
        ax.plot([], [], " ", label=f"goodput {100 * summary.goodput:.0f}% = time in kept steps {summary.useful_s:.1f} s"
                f" / wall {summary.wall_s:.1f} s")
        ax.plot([], [], " ", label="  (the rest: start-up, restarts, redone steps, saves)")
        if summary.waits:
            ax.plot([], [], " ", label=f"  {100 * (summary.goodput_elapsed or 0):.0f}% of the elapsed "
                    f"{summary.elapsed_s:.1f} s: {summary.waiting_s:.1f} s queued between {summary.sessions} sessions")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, frameon=False)  # beside: never over the curve
    fig.tight_layout()
    import uuid

    # Written beside PATH, then renamed over it; mode 0666 less the umask, applied by the kernel.
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".plot-{uuid.uuid4().hex}.png")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def tensorboard(events: list[dict[str, Any]], summary: Summary, logdir: str) -> str:
    """Write the run as TensorBoard scalars under ``logdir``: the loss that survived, and the same
    ``elastic_resume/*`` metrics the Lightning callback gives Lightning's loggers (rollbacks, LR
    scale, skipped samples, preemptions, divergences, stragglers, replays), plus the restarts
    and the goodput. Returns the event file's path."""
    from .metrics import PREFIX, RecoveryMetrics
    from .tfevents import EventFileWriter

    writer = EventFileWriter(logdir)
    try:
        step_ts = {int(e["step"]): e["ts"] for e in events if e.get("event") == Event.STEP and _rank0(e)}
        for step, loss in summary.curve:
            if math.isfinite(loss):
                writer.scalars(step, {f"{PREFIX}loss": loss}, wall_time=step_ts.get(step, 0.0))
        metrics, step = RecoveryMetrics(), 0
        for e in events:
            if not _rank0(e):
                continue
            at = next((e[k] for k in ("step", "from_step") if is_int(e.get(k))), None)
            step = at if at is not None else step
            writer.scalars(step, metrics.update(e), wall_time=e["ts"])
        for n, r in enumerate(summary.restarts, start=1):
            at = r.get("resumed_from")
            at = at if is_int(at) else step
            writer.scalars(at, {f"{PREFIX}restarts": float(n)}, wall_time=step_ts.get(at, 0.0))
        if summary.goodput is not None:
            writer.scalars(step, {f"{PREFIX}goodput": summary.goodput}, wall_time=events[-1]["ts"] if events else 0.0)
    finally:
        writer.close()
    return writer.path
