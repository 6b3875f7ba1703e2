"""The spike guard's checkpoint backend inside a Lightning ``Trainer``.

``SpikeGuard`` reaches checkpoints through ``spike.backend.CheckpointBackend``; here that contract is
fulfilled by the Trainer and ``ElasticCheckpointIO``: the health of the checkpoints ``ModelCheckpoint``
wrote under the checkpoint directory, removing the ones after a rollback's anchor, loading the
anchor into the live trainer (:func:`apply_checkpoint`), and saving (the re-committed anchor,
preemption saves) through ``trainer.save_checkpoint``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, MutableMapping
from typing import Any

from ..checkpoint.layout import ROLLBACK_DECISION
from ..checkpoint.root_records import read_record_together, write_record_together
from ..collectives import Group, on_rank0
from ..contract import Event
from ..errors import ConfigError, StorageError
from ..events import EventLog
from ..storage import open_storage
from . import _compat
from .checkpoint_io import ElasticCheckpointIO, _join

# Either namespace's Trainer (annotations only).
Trainer = Any


def apply_checkpoint(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """Load a Lightning checkpoint into a trainer that is in the middle of ``fit``, in the order
    Lightning's own restore uses, leaving the loops running (not "restarting")."""
    module = trainer.lightning_module
    module.on_load_checkpoint(checkpoint)
    trainer.strategy.load_model_state_dict(checkpoint, strict=module.strict_loading)
    precision = trainer.precision_plugin
    if type(precision).__qualname__ in checkpoint:
        precision.load_state_dict(checkpoint[type(precision).__qualname__])
    datamodule = trainer.datamodule
    if datamodule is not None and type(datamodule).__qualname__ in checkpoint:
        datamodule.load_state_dict(checkpoint[type(datamodule).__qualname__])
    trainer.fit_loop.load_state_dict(checkpoint["loops"]["fit_loop"])
    _compat.continue_loops(trainer)
    _compat.load_dataloader_states(trainer)
    trainer.strategy.load_optimizer_state_dict(checkpoint)
    for config, state in zip(trainer.lr_scheduler_configs, checkpoint.get("lr_schedulers", [])):
        config.scheduler.load_state_dict(state)
    saved = checkpoint.get("callbacks", {})
    for callback in trainer.callbacks:
        if callback.state_key in saved:
            callback.load_state_dict(saved[callback.state_key])


class TrainerBackend:
    """What ``SpikeGuard`` needs of its checkpoints, done through the Trainer and the plugin.

    Retention is Lightning's (``ModelCheckpoint(save_top_k=...)``): :meth:`protect` cannot stop
    ``ModelCheckpoint`` from removing a checkpoint; with ``save_top_k=-1`` (the recommended setting)
    nothing is removed. Lightning's drift
    fingerprint holds no optimizer settings, so the LR a rollback scales is never drift, but
    :meth:`allow_recovery_drift` still adds what the guard names to the callback's report."""

    def __init__(self, trainer: Trainer, io: ElasticCheckpointIO) -> None:
        self.trainer = trainer
        self.io = io
        self.group: Group = io.group()
        self.dirpath: str | None = None
        self.recovery_drift: list[str] = []
        self._paths: dict[int, str] = {}

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def events(self) -> EventLog:
        return self.io.events

    def _dir(self) -> str:
        if self.dirpath is None:
            raise ConfigError("ElasticResume has no checkpoint directory yet (it is set when training starts)")
        return self.dirpath

    def protect(self, steps: Collection[int]) -> None:
        """Nothing to do: ModelCheckpoint owns retention here (see the class docstring)."""

    def allow_recovery_drift(self, patterns: Iterable[str]) -> None:
        self.recovery_drift += [p for p in patterns if p not in self.recovery_drift]

    def allow_replace(self, step: int) -> None:
        """Nothing to prove here: saving a Lightning path again replaces what it holds (see
        ``ElasticCheckpointIO.save_checkpoint``)."""

    def wait(self) -> None:
        self.io.wait()

    def checkpoint_health(self) -> list[tuple[int, bool, float | None]]:
        self.io.wait()
        dirpath = self._dir()
        found = on_rank0(self.group, lambda: self.io.health(dirpath), error=lambda m: StorageError(0, m),
                         what=f"checkpoint directory {dirpath}")
        self._paths = {}
        for step, _, _, path in found:  # newest first; one path per step
            self._paths.setdefault(step, path)
        return [(step, ok, loss) for step, ok, loss, _ in found]

    def retire_newer_than(self, step: int, *, reason: str) -> list[int]:
        self.io.wait()
        dirpath = self._dir()

        def retire() -> list[int]:
            retired: dict[str, int] = {}
            for s, path in self.io.checkpoints(dirpath):
                if s > step and path not in retired:
                    self.io.remove_checkpoint(path)
                    retired[path] = s
                    self.events.emit(Event.CHECKPOINT_RETIRED, step=s, path=path, reason=reason)
            return sorted(set(retired.values()))

        return on_rank0(self.group, retire, error=lambda m: StorageError(0, m), what=f"checkpoint directory {dirpath}")

    def _decision_storage(self) -> Any:
        return open_storage(self._dir(), self.io.storage_options)

    def record_decision(self, decision: Mapping[str, Any]) -> None:
        """Rank 0 writes the rollback decision into the checkpoint directory, atomically."""
        write_record_together(self.group, self._decision_storage(), ROLLBACK_DECISION, dict(decision))

    def recorded_decision(self) -> Any:
        return read_record_together(self.group, self._decision_storage(), ROLLBACK_DECISION)

    def restore(self, state: MutableMapping[str, Any], *, step: int | None = None) -> int | None:
        """Load ``step`` into the running trainer (Lightning itself restores at the start of
        ``fit``, from ``ckpt_path``)."""
        if step is None:
            raise ConfigError("inside Lightning, fit(ckpt_path=ElasticCheckpointIO.resume_path(...)) restores; "
                              "the guard only loads rollback anchors")
        apply_checkpoint(self.trainer, self.io.load_step(self._dir(), step))
        return step

    @property
    def last_restore_tier(self) -> str:
        """Lightning's checkpoints are read from storage (the memory tier serves plain loops)."""
        return "storage"

    def save(self, step: int, state: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None,
             blocking: bool = True, health: Mapping[str, Any] | None = None) -> None:
        """A checkpoint through ``trainer.save_checkpoint``: health and metadata reach it through
        ``ElasticResume.on_save_checkpoint``."""
        path = self._paths.get(step) or _join(
            self._dir(), f"preempted-epoch={self.trainer.current_epoch}-step={step}.ckpt")
        self.trainer.save_checkpoint(path, weights_only=False)
        self._paths[step] = path
        _compat.mark_saved(self.trainer)
