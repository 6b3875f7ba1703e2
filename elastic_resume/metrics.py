"""What elastic-resume did, as metrics for the loggers users already watch: Lightning's
``trainer.loggers`` (TensorBoard, CSV, W&B) through the callback, and TensorBoard event files
written from the event logs of a plain loop (``elastic-resume report --tensorboard DIR``).

Pure: an event record in, the metrics to log out (running counts, so a curve shows when each
rollback, skipped stretch, preemption or divergence happened). Every name starts with
``elastic_resume/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .contract import Event
from .events import is_number

PREFIX = "elastic_resume/"


class RecoveryMetrics:
    """Running counts of the recoveries of one fit, and the metrics each event adds."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}

    def _add(self, name: str, amount: float = 1.0) -> float:
        self.counts[name] = self.counts.get(name, 0.0) + amount
        return self.counts[name]

    def at_start(self, *, restarts: int, resumed_from: int | None) -> dict[str, float]:
        """What a fit starts from: the worker-group restarts so far (torch's elastic agent counts
        them) and the step it resumed from."""
        out = {f"{PREFIX}restarts": float(restarts)}
        if resumed_from is not None:
            out[f"{PREFIX}resumed_from_step"] = float(resumed_from)
        return out

    def update(self, record: Mapping[str, Any]) -> dict[str, float]:
        """The metrics ``record`` (an event the guard emitted) adds; empty for most events."""
        kind = record.get("event")
        out: dict[str, float] = {}
        if kind == Event.ROLLBACK:
            out[f"{PREFIX}rollbacks"] = self._add("rollbacks")
            for field, name in (("lr_scale", "lr_scale"), ("steps_lost", "steps_lost")):
                if is_number(record.get(field)):
                    out[f"{PREFIX}{name}"] = float(record[field])
            if record.get("cause") == "replica_divergence":
                out[f"{PREFIX}divergence_rollbacks"] = self._add("divergence_rollbacks")
        elif kind == Event.DATA_SKIPPED and is_number(record.get("samples")):
            out[f"{PREFIX}samples_skipped"] = self._add("samples_skipped", float(record["samples"]))
        elif kind == Event.PREEMPTION_SAVE:
            out[f"{PREFIX}preemptions"] = self._add("preemptions")
        elif kind == Event.REPLICA_DIVERGENCE:
            out[f"{PREFIX}replica_divergences"] = self._add("replica_divergences")
        elif kind == Event.STRAGGLER_DETECTED:
            out[f"{PREFIX}stragglers"] = self._add("stragglers")
            if is_number(record.get("ratio")):
                out[f"{PREFIX}straggler_ratio"] = float(record["ratio"])
        elif kind == Event.REPLAY_VERIFIED and is_number(record.get("steps")):
            out[f"{PREFIX}replay_steps_verified"] = self._add("replay_steps_verified", float(record["steps"]))
        elif kind == Event.REPLAY_MISMATCH:
            out[f"{PREFIX}replay_mismatches"] = self._add("replay_mismatches")
        return out
