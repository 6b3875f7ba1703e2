"""``ElasticResume``: the spike guard inside Lightning's training loop.

The callback runs a ``SpikeGuard`` (the same detectors, the same one-collective vote, the same
pure rollback policy as a plain loop) whose checkpoint backend is the Trainer and
``ElasticCheckpointIO`` (``backend.py``) instead of a ``CheckpointManager``:

- per optimizer step (``on_train_batch_end``): the loss of the step (with gradient
  accumulation, the mean over its micro-batches; a NaN/Inf in any of them counts), this rank's
  NaN/Inf check, the vote, then the detectors on the loss averaged over all ranks (or on each
  rank's, with ``judge="rank"``);
- before every checkpoint, whoever takes it (``on_save_checkpoint``, on every rank): the vote in
  flight is read, so a checkpoint that holds a spike is recorded as unhealthy;
- rollback, in-process and on every rank in the same step: newer checkpoints are removed, the
  anchor is loaded (agreed by all ranks) into the live model, optimizers, schedulers, loop
  counters, callbacks and dataloader position, the bad data window is skipped, the LR scaled,
  and the loop's data iterator restarted at the new position. ``fit`` is never re-entered;
- preemption (SIGUSR1/SIGTERM through ``elastic-resume launch``): the flag rides in the vote,
  every rank saves the same step, training stops, and ``exit_code`` becomes 75;
- on resume (``on_load_checkpoint``): the drift report, from the hyper-parameters of the module
  and datamodule, the model's parameters, versions and world size.

Works with ``pytorch_lightning`` and ``lightning.pytorch`` alike; the Lightning internals it
touches are all in ``_compat.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from torch.nn.parallel import DistributedDataParallel

from .. import heartbeat
from ..checkpoint import drift as drift_report
from ..checkpoint import fingerprint as fingerprints
from ..checkpoint.state import RNGState
from ..contract import Event, ExitCode
from ..errors import ConfigError
from ..metrics import RecoveryMetrics
from ..spike.guard import GuardOptions, SpikeGuard
from ..training.ddp import settle_ddp_buckets
from ..training.loader import ResumableDataLoader
from ..training.sampler import ResumableDistributedSampler
from . import _compat
from ._compat import CALLBACK_BASES
from .backend import TrainerBackend
from .checkpoint_io import CHECKPOINT_KEY, ElasticCheckpointIO, normalize_path

log = logging.getLogger("elastic_resume")

# Either namespace's Trainer and LightningModule (annotations only).
Trainer = Any
LightningModule = Any


def find_checkpoint_io(trainer: Trainer) -> ElasticCheckpointIO:
    """The trainer's ElasticCheckpointIO, also inside Lightning's ``AsyncCheckpointIO``."""
    io: Any = trainer.strategy.checkpoint_io
    while not isinstance(io, ElasticCheckpointIO) and getattr(io, "checkpoint_io", None) is not None:
        io = io.checkpoint_io
    if not isinstance(io, ElasticCheckpointIO):
        raise ConfigError(
            f"ElasticResume needs Trainer(plugins=[ElasticCheckpointIO(...)]); this trainer writes checkpoints "
            f"with {type(io).__name__}, which neither verifies them nor lets ranks agree on one"
        )
    return io


def _loaders(obj: Any) -> Iterable[Any]:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _loaders(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _loaders(v)
    elif obj is not None:
        yield obj


def find_sampler(trainer: Trainer) -> ResumableDistributedSampler | None:
    for loader in _loaders(trainer.train_dataloader):
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableDistributedSampler):
            if not isinstance(loader, ResumableDataLoader):
                log.warning("the training dataloader uses ResumableDistributedSampler but is a %s: Lightning does not "
                            "checkpoint its position; use elastic_resume.lightning.ResumableDataLoader",
                            type(loader).__name__)
            return sampler
    return None


def settle_ddp(trainer: Trainer, pl_module: LightningModule) -> None:
    """At 3+ DDP ranks, settle DDP's gradient buckets before the first step, in every run alike,
    so a resumed run adds gradients in the same order as one that never stopped (see
    ``elastic_resume.ddp``). Needs the module's ``example_input_array`` and a ``forward`` that
    uses every trained parameter; without it, resumes are exact to the last bits only."""
    model = trainer.strategy.model
    if not isinstance(model, DistributedDataParallel) or trainer.world_size < 3:
        return
    example = pl_module.example_input_array
    if example is None:
        log.warning("ElasticResume: set example_input_array on the LightningModule for bit-exact resumes with "
                    "DDP at 3 or more ranks (DDP re-orders its gradient sums after its first backward)")
        return
    example = trainer.strategy.batch_to_device(example)
    if isinstance(example, dict):
        settle_ddp_buckets(model, **example)
    else:
        settle_ddp_buckets(model, *(example if isinstance(example, tuple) else (example,)))


# Derives from the Callback of each importable namespace, so either Trainer accepts it.
class ElasticResume(*CALLBACK_BASES):  # type: ignore[misc]
    """Loss-spike rollback, preemption saves and the drift report for a Lightning ``Trainer``.

    Needs ``ElasticCheckpointIO`` as the trainer's checkpoint plugin, and a checkpoint directory
    (``ModelCheckpoint(dirpath=...)``, or ``dirpath=`` here) where ``ModelCheckpoint`` saves the
    checkpoints a rollback can go back to (``save_top_k=-1`` keeps them all). For exact data
    positions (mid-epoch resume, skipping the bad window) train on a ``ResumableDataLoader`` with
    ``Trainer(use_distributed_sampler=False)``.

    After ``fit`` returns, ``exit_code`` is 75 if training stopped for a preemption save (exit
    with it so the launcher requeues), else 0. A spike with the rollback budget spent raises
    ``GaveUpError`` out of ``fit`` (exit with ``EXIT_GAVE_UP``, 76).
    """

    def __init__(
        self,
        options: GuardOptions | None = None,
        *,
        dirpath: str | None = None,
        loss_key: str = "loss",
        drift: str = "warn",
        drift_allow: Iterable[str] = (),
        **settings: Any,
    ) -> None:
        """``options`` (or the same names as keyword settings: ``detectors``, ``policy``,
        ``quorum``, ``vote_every``, ``lag``, ``health_window``, ``judge``; see
        ``GuardOptions``) say how spikes are found and handled, as for ``SpikeGuard``.
        ``dirpath``: where ModelCheckpoint saves (default: its ``dirpath``); ``loss_key``: the
        loss in ``training_step``'s output; ``drift``/``drift_allow``: the report on resume."""
        if options is not None and settings:
            raise ConfigError(f"ElasticResume: pass GuardOptions or keyword settings, not both "
                              f"(got options and {', '.join(sorted(settings))})")
        self.options = options if options is not None else GuardOptions(**settings)
        drift_report.check_policy(drift, "ElasticResume")
        self._dirpath = dirpath
        self.loss_key = loss_key
        self.drift = drift
        self.drift_allow = list(drift_allow)  # the fingerprint has no optimizer entries: LR scaling is no drift
        self.exit_code = 0
        self.guard: SpikeGuard | None = None
        self.checkpoints: TrainerBackend | None = None
        self._state: dict[str, Any] = {}
        self._loaded: dict[str, Any] | None = None
        self._metrics = RecoveryMetrics()  # what the trainer's loggers are told (rollbacks, restarts, ...)
        self._last_step: int | None = None
        self._run_fingerprint: dict[str, Any] | None = None
        self._pending_rng: tuple[dict[str, Any], bool] | None = None
        self._micro_losses: list[float] = []  # this optimizer step's micro-batches so far

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (ddp_spawn, deepcopy(trainer.callbacks), torch.save(trainer)): the settings
        # travel; the live guard (process groups, the trainer, optimizers) is rebuilt at setup.
        state = dict(self.__dict__)
        state.update(guard=None, checkpoints=None, _state={}, _pending_rng=None, _run_fingerprint=None)
        return state

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.guard is not None:
            return
        # Collective (every rank builds its groups here, in the same order): the agreement group
        # of the plugin, then the vote's.
        self.checkpoints = TrainerBackend(trainer, find_checkpoint_io(trainer))
        self.guard = SpikeGuard(self.checkpoints, self._state, self.options)
        # What the guard does also reaches the loggers the user watches, as running counts.
        self.guard.on_event = lambda record: self._to_loggers(trainer, self._metrics.update(record))
        if self._loaded is not None:
            self.load_state_dict(self._loaded)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.guard is not None and self.checkpoints is not None
        dirpath = self._dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
        if not dirpath:
            raise ConfigError("ElasticResume needs a checkpoint directory: ModelCheckpoint(dirpath=...) or "
                              "ElasticResume(dirpath=...)")
        self.checkpoints.dirpath = normalize_path(dirpath)
        for i, optimizer in enumerate(trainer.optimizers):
            self._state[f"optimizer{i}"] = optimizer
        for i, config in enumerate(trainer.lr_scheduler_configs):
            self._state[f"scheduler{i}"] = config.scheduler
        # Under DDP the module's parameters are replicas: their digest rides on the vote.
        self.guard.replica_state = {"model": pl_module} if isinstance(trainer.strategy.model,
                                                                      DistributedDataParallel) else {}
        self.guard.sampler = find_sampler(trainer)
        if self.guard.sampler is None and self.guard.policy.skip_data:
            log.warning("ElasticResume: the training dataloader has no ResumableDistributedSampler, so a rollback "
                        "cannot skip the data around a spike (it replays it); use ResumableDataLoader")
        if self.guard.attach(trainer.global_step if trainer.ckpt_path else None) is not None:
            # A rollback decided before the last stop was carried out now: the loop goes on
            # from its anchor, at the skipped-ahead data position.
            self._continue_from(trainer)
        self._last_step = trainer.global_step
        self._to_loggers(trainer, self._metrics.at_start(
            restarts=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            resumed_from=trainer.global_step if trainer.ckpt_path else None))
        # What identifies the run does not change while it trains: computed once, not per save.
        self._run_fingerprint = self._fingerprint(trainer, pl_module)
        settle_ddp(trainer, pl_module)

    # -- the per-step check ----------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.guard is not None
        self._micro_losses.append(_compat.raw_loss(trainer, pl_module, self._loss(outputs)))
        step = trainer.global_step
        if step == self._last_step:
            heartbeat.beat()  # accumulating gradients: progress, but no optimizer step yet
            return
        self._last_step = step
        # The step's loss is the mean over its micro-batches (NaN if any of them was): a spike
        # in the first micro-batch of an accumulated step counts as much as one in the last.
        loss = sum(self._micro_losses) / len(self._micro_losses)
        self._micro_losses = []
        outcome = self.guard.step(step, loss, epoch=trainer.current_epoch)
        if outcome.rolled_back:
            self._continue_from(trainer)
        elif outcome.preempted:
            self.exit_code = ExitCode.PREEMPTED
            trainer.should_stop = True

    # Validation, test and predict batches are progress too: the launcher's hang watch must not
    # take a long validation epoch between two training steps for a hang.
    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        heartbeat.beat()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        heartbeat.beat()

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        heartbeat.beat()

    def _loss(self, outputs: Any) -> float:
        loss = outputs.get(self.loss_key) if isinstance(outputs, dict) else outputs
        if loss is None:
            raise ConfigError(
                f"ElasticResume reads the loss from training_step's output (key {self.loss_key!r}) but got "
                f"{type(outputs).__name__}; return the loss (or a dict with it), or set ElasticResume(loss_key=...)"
            )
        return float(loss)

    def _continue_from(self, trainer: Trainer) -> None:
        """After a rollback: the next batch must come from the restored (and skipped-ahead)
        position, so the loop's data iterator starts over from the loader."""
        _compat.restart_data_fetcher(trainer)
        self._micro_losses = []
        self._last_step = trainer.global_step  # ModelCheckpoint already knows: the anchor was re-committed

    # -- checkpoints -------------------------------------------------------------------------------
    @staticmethod
    def _to_loggers(trainer: Trainer, metrics: Mapping[str, float]) -> None:
        """Every logger of the trainer (each logs from rank 0 only), at the current step."""
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(dict(metrics), step=trainer.global_step)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.guard is None or self.checkpoints is None or self.checkpoints.dirpath is None:
            return
        self.guard.settle()  # every rank: Lightning dumps checkpoints on all of them
        self.guard.check_replicas(trainer.global_step)  # rank 0 writes its copy: every copy must agree
        metadata, health = self.guard.record_checkpoint(trainer.global_step)
        checkpoint[CHECKPOINT_KEY] = {
            "metadata": metadata, "health": health, "world_size": trainer.world_size,
            "fingerprint": self._run_fingerprint or self._fingerprint(trainer, pl_module),
        }

    def state_dict(self) -> dict[str, Any]:
        if self.guard is None or self.checkpoints is None:
            return {}
        # Detectors and random streams are each rank's own; Lightning writes rank 0's dict (every
        # rank calls this while dumping), so one gather makes it carry every rank's.
        mine = {"detectors": self.guard.bank.state_dict(), "rng": RNGState().state_dict()}
        ranks = self.checkpoints.group.all_gather_object(mine)
        return {"recovery": self.guard.recovery.state_dict(), "detectors": [r["detectors"] for r in ranks],
                "rng": [r["rng"] for r in ranks]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.guard is None or self.checkpoints is None:
            self._loaded = state_dict  # restored before setup(): applied there
            return
        self.guard.recovery.load_state_dict(state_dict["recovery"])
        rank, world = self.checkpoints.rank, self.checkpoints.group.world_size
        detectors = state_dict["detectors"]
        self.guard.bank.load_state_dict(detectors[rank] if len(detectors) == world else detectors[0])
        streams = state_dict.get("rng")  # absent in checkpoints written before streams were saved
        if streams:
            self._pending_rng = (streams[rank] if len(streams) == world else streams[0], len(streams) == world)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """The random streams of a loaded checkpoint go live here, right before the first
        training step after the load: between the load and this point Lightning itself draws
        from them (creating the dataloader iterator draws its base seed), which the run that
        saved the checkpoint had done before saving."""
        if self._pending_rng is None:
            return
        streams, same_world = self._pending_rng
        self._pending_rng = None
        rng = RNGState()
        if same_world:
            rng.load_state_dict(streams)
        else:  # no saved stream for this rank; reusing another rank's would correlate them
            assert self.checkpoints is not None
            rng.reshard(streams, self.checkpoints.rank, self.checkpoints.group.world_size)
            self.checkpoints.events.emit(Event.RNG_RESEEDED, step=trainer.global_step,
                                         world_size=self.checkpoints.group.world_size)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        restored_from = (checkpoint.get(CHECKPOINT_KEY) or {}).get("restored_from")
        if restored_from:  # a fallback: the log and trainer.ckpt_path name what was loaded
            _compat.set_restored_path(trainer, restored_from["path"])
        if self.drift == "ignore":
            return
        events = self.checkpoints.events if self.checkpoints is not None else find_checkpoint_io(trainer).events
        allow = [*self.drift_allow, *(self.checkpoints.recovery_drift if self.checkpoints is not None else [])]
        drift_report.check((checkpoint.get(CHECKPOINT_KEY) or {}).get("fingerprint"), self._fingerprint(trainer, pl_module),
                           step=checkpoint.get("global_step"), policy=self.drift, allow=allow, events=events,
                           restored_tree=checkpoint.get("optimizer_states"), hint="ElasticResume(drift_allow=[...])")

    @staticmethod
    def _fingerprint(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        datamodule = trainer.datamodule
        data = None
        if datamodule is not None:
            data = {"class": type(datamodule).__qualname__, **dict(datamodule.hparams)}
        return fingerprints.compute({"model": pl_module}, world_size=trainer.world_size,
                                    config=dict(pl_module.hparams), data_description=data)
