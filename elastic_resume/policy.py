"""The rollback policy: a pure decision from plain values (a vote result, the committed
checkpoints with their health, the recovery so far) to an action. No I/O, no collectives: every
rank evaluates it on the same inputs and so takes the same action in the same iteration.

The recipe it encodes is the published one: PaLM restarted about 100 steps before a spike and
skipped 200-500 batches; OPT and BLOOM rolled back and lowered the learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .vote import VoteResult


@dataclass(kw_only=True)
class RollbackPolicy:
    """How to react to an agreed spike with onset at step S."""

    margin: int = 100
    """Roll back to the newest healthy checkpoint at or before S - margin."""
    skip_after: int = 200
    """Skip the data from the anchor's position through the data of step S + skip_after."""
    skip_data: bool = True
    """False: roll back and replay the same data (only sensible for transient spikes)."""
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


@dataclass(frozen=True)
class Action:
    kind: str  # continue | save | rollback | stop
    onset: int | None = None
    anchor: int | None = None
    skip_through_step: int | None = None
    reason: str = ""


def decide(
    policy: RollbackPolicy,
    vote: VoteResult,
    checkpoints: list[tuple[int, bool]] | None,
    recovery: Recovery,
) -> Action:
    """``checkpoints``: committed (step, healthy) pairs; only consulted for a rollback (None
    means not fetched yet: the caller fetches them when the answer is ``needs_checkpoints``)."""
    if vote.stop:
        return Action("stop", onset=vote.step, reason=f"a detector asked to stop the run at step {vote.step}")
    if not vote.spike:
        return Action("save" if vote.preempt else "continue")
    onset = vote.step
    if recovery.cooldown_left > 0:
        return Action("continue", onset=onset, reason=f"spike at step {onset} ignored: cooling down for {recovery.cooldown_left} more steps")
    if recovery.rollbacks >= policy.budget:
        return Action("stop", onset=onset, reason=(
            f"loss spike at step {onset} ({vote.spikes} of {vote.world_size} ranks, {vote.nonfinite} non-finite) "
            f"but the rollback budget of {policy.budget} is spent"))
    if checkpoints is None:
        return Action("needs_checkpoints", onset=onset)
    limit = onset - policy.margin
    healthy = [s for s, ok in checkpoints if ok and s <= limit]
    if not healthy and policy.restart_from_scratch and any(s == 0 for s, _ in checkpoints):
        healthy = [0]
    if not healthy:
        return Action("stop", onset=onset, reason=(
            f"loss spike at step {onset} but no healthy checkpoint at or before step {limit} "
            f"(margin {policy.margin}) to roll back to; set restart_from_scratch=True to restart from step 0"))
    anchor = max(healthy)
    skip_through = onset + policy.skip_after if policy.skip_data else None
    return Action("rollback", onset=onset, anchor=anchor, skip_through_step=skip_through,
                  reason=f"loss spike at step {onset} ({vote.spikes} of {vote.world_size} ranks, {vote.nonfinite} non-finite)")
