"""The drift report: how the run being resumed differs from the run that saved the checkpoint.

One check for the plain loop (``CheckpointManager.restore``) and Lightning (``ElasticResume``):
compare the saved fingerprint with the current one, say what differs, and say where a changed
value will not take effect because the checkpoint overrides it: a new ``lr`` in the config while
the restored optimizer keeps the saved one is the classic surprise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ..contract import Event, StrEnum
from ..errors import ConfigError, DriftError
from ..events import EventLog
from . import fingerprint as fingerprints

log = logging.getLogger("elastic_resume")

class DriftPolicy(StrEnum):
    """What a difference between the saved and the current fingerprint does."""

    WARN = "warn"  #: a warning and a ``drift_found`` event (the default)
    FAIL = "fail"  #: ``DriftError``: the restore does not happen
    IGNORE = "ignore"  #: nothing (no comparison is made)


def check_policy(policy: str, where: str) -> DriftPolicy:
    """``policy`` as a :class:`DriftPolicy`; a ConfigError naming ``where`` if it is none."""
    try:
        return DriftPolicy(policy)
    except ValueError:
        raise ConfigError(f"{where}(drift=...) must be one of {', '.join(p.value for p in DriftPolicy)} "
                          f"(got {policy!r})") from None


def optimizer_settings(tree: Any) -> dict[str, list[Any]]:
    """Every param-group setting (``lr``, ``weight_decay``, ``betas``, ...) of the optimizer
    states in a checkpoint tree, with the values saved for it (what a restore puts back)."""
    found: dict[str, list[Any]] = {}

    def visit(node: Any, depth: int) -> None:
        if depth > 4:
            return
        if isinstance(node, Mapping):
            groups = node.get("param_groups")
            if isinstance(groups, list) and "state" in node:
                for group in groups:
                    if isinstance(group, Mapping):
                        for key, value in group.items():
                            if key != "params" and value not in found.setdefault(key, []):
                                found[key].append(value)
                return
            for value in node.values():
                visit(value, depth + 1)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value, depth + 1)

    visit(tree, 0)
    return found


def report_lines(diffs: list[fingerprints.Difference], restored: Mapping[str, list[Any]]) -> list[str]:
    """One line per difference; a changed config value that the restored optimizer overrides
    says so."""
    lines = []
    for d in diffs:
        line = d.line()
        key = d.name.rsplit(".", 1)[-1]
        if d.name.startswith("config.") and key in restored:
            kept = ", ".join(repr(v) for v in restored[key])
            line += (f" (overridden by the checkpoint: the restored optimizer keeps {key}={kept}; "
                     f"set it after the restore for the new value to apply)")
        lines.append(line)
    return lines


def check(saved: Mapping[str, Any] | None, current: Mapping[str, Any], *, step: int | None, policy: str,
          allow: Iterable[str], events: EventLog, restored_tree: Any = None, hint: str = "drift_allow=[...]") -> list[str]:
    """Report drift between ``saved`` and ``current`` fingerprints: an event, then a warning
    (``policy="warn"``) or ``DriftError`` (``"fail"``). Returns the report's lines."""
    if policy == DriftPolicy.IGNORE or not saved:
        return []
    diffs = fingerprints.diff(saved, current, allow=allow)
    if not diffs:
        return []
    lines = report_lines(diffs, optimizer_settings(restored_tree))
    events.emit(Event.DRIFT_FOUND, step=step, differences=lines, policy=policy)
    message = (f"the run resuming from step {step} differs from the run that saved it "
               f"({len(lines)} difference{'s' if len(lines) != 1 else ''}):\n  " + "\n  ".join(lines))
    if policy == DriftPolicy.FAIL:
        raise DriftError(f"{message}\nAllow expected differences with {hint} or drift='warn'.")
    log.warning("%s", message)
    return lines
