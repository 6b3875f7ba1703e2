"""Replays that must agree: after a restart, the steps trained again were trained before, and the
event log holds what they gave then (rank 0's ``step`` lines: loss, gradient norm). As they are
trained again, compare, bit for bit: ``replay_verified`` says how many matched, ``replay_mismatch``
names the first that did not, with both values.

A resume that is exact on the user's own run is then shown, not assumed; nondeterminism in the
user's step (an unseeded augmentation, a nondeterministic kernel) or a chip computing wrong numbers
shows at the first replay. Only rank 0 checks (it writes the step lines); the check reads nothing
per step and sends nothing.

Where the history comes from: this process's event log and, in the launcher's default layout
(``elastic-resume-logs/<run id>/``), the other files of the run beside it, so a restarted agent's
file and a requeued job's earlier files both count. Only lines of this run (the launcher's
``ER_RUN_ID``, else torch's ``TORCHELASTIC_RUN_ID``; a requeued Slurm job keeps its run id),
from the restored step's own line on; for each step the last line wins: that is the timeline the
fault cut short. A restart before the first checkpoint, or a rollback (other data, other
settings), is not checked.
"""

from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from ..contract import Env, Event
from ..events import RUN, is_int, is_number, load_events


def same_bits(a: float | None, b: float | None) -> bool:
    """Bitwise equality of two float64 values (NaN equals the same NaN; -0.0 differs from 0.0)."""
    if a is None or b is None:
        return a is b
    return struct.pack("<d", a) == struct.pack("<d", b)


Recorded = dict[int, tuple[float, float | None]]  #: step -> (loss, gradient norm) written before


#: torch's agent gives every worker the rendezvous run id (the launcher's ``run_id``).
RUN_ID_ENV = "TORCHELASTIC_RUN_ID"


def recorded_steps(event_log: str | None, after_step: int, run_id: str | None = None) -> Recorded:
    """What the timeline that reached ``after_step`` recorded for the steps after it: rank 0's
    step lines of this run (``run_id``, by default this worker's) in ``event_log`` (and the run's
    files beside it, in the launcher's layout), written after that timeline's own line for ``after_step`` (so an older
    timeline, or another experiment that reused the run id, is never compared); the last line
    of each step wins. Empty without a log, a run id or that line."""
    run_id = run_id if run_id is not None else os.environ.get(Env.RUN_ID) or os.environ.get(RUN_ID_ENV)
    if not event_log or not run_id:
        return {}
    directory = os.path.dirname(os.path.abspath(event_log))
    # The launcher's own layout, elastic-resume-logs/<run id>/<host>-<pid>.jsonl, holds this run's
    # files only: read them all (an earlier agent's, a requeued job's). A log the user named may
    # sit beside anything: read that file only.
    if os.path.basename(directory) == run_id:
        files = sorted(glob.glob(os.path.join(glob.escape(directory), "*.jsonl")))
    else:
        files = [event_log] if os.path.isfile(event_log) else []
    try:
        logs = load_events(files)
    except Exception:  # noqa: BLE001 - an unreadable log loses the check, never the run
        return {}
    # Lines no launcher tagged (plain torchrun with ER_EVENT_LOG) count too: the anchor below
    # keeps another timeline's lines out.
    lines = [e for e in logs.events if e.get(RUN) in (run_id, None) and e.get("event") == Event.STEP
             and e.get("rank") in (0, None) and is_int(e.get("step"))]
    anchor = max((e["ts"] for e in lines if e["step"] == after_step), default=None)
    if anchor is None:
        return {}
    out: Recorded = {}
    for e in lines:  # by time: a later line of a step replaces an earlier one
        loss, grad = e.get("loss"), e.get("grad_norm")
        if e["step"] > after_step and e["ts"] > anchor and is_number(loss):
            out[e["step"]] = (float(loss), float(grad) if is_number(grad) else None)
    return out


@dataclass
class ReplayCheck:
    """Compares steps trained again with what the same steps gave before. Feed every step with
    :meth:`observe`; it returns the event to write (once), or None."""

    resumed_from: int
    expected: Recorded
    cause: str = "restart"
    matched: list[int] = field(default_factory=list)
    done: bool = False
    last: int = field(init=False)  #: the last step of the window (observe runs every step: not a max() each time)

    def __post_init__(self) -> None:
        self.done = not self.expected
        self.last = max(self.expected, default=self.resumed_from)

    def observe(self, step: int, loss: float, grad_norm: float | None) -> tuple[str, dict[str, Any]] | None:
        if self.done or step not in self.expected:
            if not self.done and step > self.last:  # past the window without seeing its end
                return self.finish()
            return None
        want_loss, want_grad = self.expected[step]
        grad_differs = want_grad is not None and grad_norm is not None and not same_bits(want_grad, grad_norm)
        if not same_bits(want_loss, loss) or grad_differs:
            self.done = True
            what = "gradient norm" if same_bits(want_loss, loss) else "loss"
            return Event.REPLAY_MISMATCH, {
                "step": step, "cause": self.cause, "resumed_from": self.resumed_from, "what": what,
                "recorded": want_loss if what == "loss" else want_grad,
                "replayed": loss if what == "loss" else grad_norm,
                "matched_before": len(self.matched),
                "reason": (f"step {step}, trained again after a {self.cause} from step {self.resumed_from}, gave "
                           f"{what} {_show(loss if what == 'loss' else grad_norm)} where it gave "
                           f"{_show(want_loss if what == 'loss' else want_grad)} before ({len(self.matched)} "
                           "replayed step(s) matched before it): the step is not deterministic, or a device "
                           "computes wrong numbers")}
        self.matched.append(step)
        return self.finish() if step >= self.last else None

    def finish(self) -> tuple[str, dict[str, Any]] | None:
        """The verdict for the steps replayed so far (at the window's end, or when a rollback or
        the end of training cuts it short); None when there is nothing to say."""
        if self.done:
            return None
        self.done = True
        if not self.matched:
            return None
        return Event.REPLAY_VERIFIED, {
            "cause": self.cause, "resumed_from": self.resumed_from, "steps": len(self.matched),
            "from_step": min(self.matched), "to_step": max(self.matched),
            "of": len(self.expected), "compared": "loss and gradient norm" if any(
                g is not None for _, g in self.expected.values()) else "loss"}


def _show(v: float | None) -> str:
    return "none" if v is None else repr(v)
