"""The rollback policy: a pure decision from plain values (a vote result, the committed
checkpoints with their health, the recovery so far) to an action. No I/O, no collectives: every
rank evaluates it on the same inputs and so takes the same action in the same iteration.

The recipe it encodes is the published one: PaLM restarted about 100 steps before a spike and
skipped 200-500 batches; OPT and BLOOM rolled back and lowered the learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..contract import StrEnum
from ..errors import ConfigError
from .detectors import Anchor
from .vote import VoteResult


@dataclass(kw_only=True)
class RollbackPolicy:
    """How to react to an agreed spike with onset at step S."""

    margin: int = 100
    """Roll back to the newest healthy checkpoint at or before S - margin."""
    skip_after: int = 200
    """Skip the data from the anchor's position through the data of step S + skip_after."""
    skip_data: bool = True
    """False: roll back and replay the same data (only sensible for transient spikes). A
    plateau's rollback skips data only when its ``Plateau(skip_data=True)`` asks too."""
    lr_scale: float = 1.0
    """Multiply the learning rate by this after each rollback (e.g. 0.5)."""
    clip_scale: float = 1.0
    """Multiply ``SpikeGuard.clip_scale`` (use it for gradient clipping) after each rollback."""
    budget: int = 3
    """Rollbacks allowed in the whole run; one more spike then stops it (exit code 76)."""
    cooldown: int = 0
    """Steps trained after a rollback during which new spikes are ignored."""
    restart_from_scratch: bool = False
    """When no healthy checkpoint is old enough: restart from step 0 (saved at start) instead of stopping."""

    def __post_init__(self) -> None:
        for name in ("margin", "skip_after", "budget", "cooldown"):
            if getattr(self, name) < 0:
                raise ConfigError(f"RollbackPolicy.{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("lr_scale", "clip_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"RollbackPolicy.{name} must be > 0 (got {getattr(self, name)})")


@dataclass
class Recovery:
    """What recoveries happened so far; part of the checkpointed state (replicated), so a
    requeue neither repeats nor forgets a rollback."""

    rollbacks: int = 0
    lr_scale: float = 1.0
    clip_scale: float = 1.0
    cooldown_left: int = 0  # steps still to train before spikes count again
    windows: list[list[int]] = field(default_factory=list)  # skipped [start, end) global samples
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "lr_scale": self.lr_scale, "clip_scale": self.clip_scale,
                "cooldown_left": self.cooldown_left, "windows": [list(w) for w in self.windows],
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks = int(state["rollbacks"])
        self.lr_scale = float(state["lr_scale"])
        self.clip_scale = float(state["clip_scale"])
        self.cooldown_left = int(state["cooldown_left"])
        self.windows = [list(w) for w in state["windows"]]
        self.history = list(state["history"])


#: Why a rollback happens: a spike, or replicas that stopped agreeing (``replicas``).
CAUSES = ("spike", "replica_divergence")


@dataclass(frozen=True)
class RollbackDecision:
    """A rollback as decided, written to storage before it is carried out: everything needed to
    carry out the same rollback again after a crash (the anchor, the data to skip, the recovery
    state it starts from). The re-committed anchor makes it moot: its recovery state counts
    one more rollback than :attr:`recovery` does."""

    onset: int
    anchor: int
    skip_through_step: int | None
    skip_end: int | None  #: absolute sample position where data resumes (None: no skip)
    reason: str
    at_step: int  #: the step training had reached when it was decided
    recovery: dict[str, Any]  #: ``Recovery.state_dict()`` at the decision
    cause: str = "spike"
    """``spike`` (the policy's LR and clipping scales and cooldown apply) or
    ``replica_divergence`` (the same steps are trained again, on the same data and settings)."""

    FORMAT = "elastic-resume-rollback-decision"

    def to_json(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "onset": self.onset, "anchor": self.anchor,
                "skip_through_step": self.skip_through_step, "skip_end": self.skip_end, "reason": self.reason,
                "at_step": self.at_step, "recovery": self.recovery, "cause": self.cause}

    @classmethod
    def from_json(cls, doc: Any) -> RollbackDecision | None:
        """Decoded with bounds, never trusted: anything but a well-formed record is None."""
        if not isinstance(doc, dict) or doc.get("format") != cls.FORMAT:
            return None

        def count(v: Any, optional: bool = False) -> bool:
            return (optional and v is None) or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62)

        fields = ("onset", "anchor", "at_step")
        if not all(count(doc.get(k)) for k in fields) or not all(
                count(doc.get(k), optional=True) for k in ("skip_through_step", "skip_end")):
            return None
        if not isinstance(doc.get("reason"), str) or not isinstance(doc.get("recovery"), dict):
            return None
        if doc.get("cause", "spike") not in CAUSES:
            return None
        try:
            Recovery().load_state_dict(doc["recovery"])  # the shape a Recovery loads, or none
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
        return cls(onset=doc["onset"], anchor=doc["anchor"], skip_through_step=doc["skip_through_step"],
                   skip_end=doc["skip_end"], reason=doc["reason"][:2000], at_step=doc["at_step"], recovery=doc["recovery"],
                   cause=doc.get("cause", "spike"))


class ActionKind(StrEnum):
    """What every rank does after a vote."""

    CONTINUE = "continue"  #: train on
    SAVE = "save"  #: a preemption save (the vote carried the flag), then exit 75
    ROLLBACK = "rollback"  #: restore ``anchor`` in-process and skip the data window
    STOP = "stop"  #: give up (exit 76): budget spent, no anchor, or a detector asked
    NEEDS_CHECKPOINTS = "needs_checkpoints"  #: ask again with the checkpoints' health (fetched only then)


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    onset: int | None = None
    anchor: int | None = None
    skip_through_step: int | None = None
    reason: str = ""


def lowest_loss(steps: list[int], losses: dict[int, float | None]) -> int | None:
    """Of ``steps``, the one with the lowest finite recorded loss (of equal ones the newest);
    None when none has one. A plateau's ``rollback_to="lowest_loss"`` anchor."""
    recorded = [s for s in steps if isinstance(losses.get(s), float) and math.isfinite(losses[s])]  # type: ignore[arg-type]
    return min(recorded, key=lambda s: (losses[s], -s)) if recorded else None


def trigger(vote: VoteResult) -> str:
    """What the vote agreed on, in words (for the reason of the action taken on it)."""
    at = f"at step {vote.step}"
    if vote.nonfinite:
        return f"non-finite loss or gradient norm {at} on {vote.nonfinite} of {vote.world_size} ranks"
    if vote.verdict is not None and vote.verdict.spike and vote.spikes < vote.quorum:
        kind = "plateau" if vote.verdict.plateau else "loss spike"
        return f"{kind} {at} in the loss over all {vote.world_size} ranks ({vote.verdict.reason})"
    return f"loss spike {at} on {vote.spikes} of {vote.world_size} ranks"


def decide(
    policy: RollbackPolicy,
    vote: VoteResult,
    checkpoints: list[tuple[int, bool]] | list[tuple[int, bool, float | None]] | None,
    recovery: Recovery,
) -> Action:
    """``checkpoints``: committed ``(step, healthy)`` or ``(step, healthy, recorded loss)``;
    only consulted for a rollback (None means not fetched yet: the caller fetches them when the
    answer is ``needs_checkpoints``)."""
    if vote.stop:
        reason = f"a detector asked to stop the run at step {vote.step}"
        if vote.verdict is not None and vote.verdict.stop:
            reason += f": {vote.verdict.reason}"
        return Action(ActionKind.STOP, onset=vote.step, reason=reason)
    if not vote.spike:
        return Action(ActionKind.SAVE if vote.preempt else ActionKind.CONTINUE)
    onset = vote.step
    what = trigger(vote)
    if recovery.cooldown_left > 0:
        return Action(ActionKind.CONTINUE, onset=onset,
                      reason=f"{what} ignored: cooling down for {recovery.cooldown_left} more steps")
    if recovery.rollbacks >= policy.budget:
        return Action(ActionKind.STOP, onset=onset, reason=(
            f"{what}, but the rollback budget of {policy.budget} is spent"))
    if checkpoints is None:
        return Action(ActionKind.NEEDS_CHECKPOINTS, onset=onset)
    plateau = vote.verdict if vote.plateau_only else None
    limit = onset - policy.margin
    losses = {c[0]: (c[2] if len(c) > 2 else None) for c in checkpoints}
    healthy = [c[0] for c in checkpoints if c[1] and c[0] <= limit]
    if not healthy and policy.restart_from_scratch and any(c[0] == 0 for c in checkpoints):
        healthy = [0]
    if not healthy:
        return Action(ActionKind.STOP, onset=onset, reason=(
            f"{what}, but no healthy checkpoint at or before step {limit} "
            f"(margin {policy.margin}) to roll back to; set restart_from_scratch=True to restart from step 0"))
    anchor = max(healthy)
    if plateau is not None and plateau.rollback_to == Anchor.LOWEST_LOSS:
        anchor = lowest_loss(healthy, losses) or anchor
    skip = policy.skip_data and (plateau is None or plateau.skip_data)
    skip_through = onset + policy.skip_after if skip else None
    return Action(ActionKind.ROLLBACK, onset=onset, anchor=anchor, skip_through_step=skip_through,
                  reason=what)
