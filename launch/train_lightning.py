"""A PyTorch Lightning training script using elastic-resume (DDP; gloo on CPU, NCCL on GPUs).

Run it under the launcher (or plain ``torchrun``)::

    elastic-resume launch --nproc-per-node 2 launch/train_lightning.py --root /tmp/ckpt --steps 60

What it shows, in Lightning's own terms:

- ``ElasticCheckpointIO`` as the checkpoint plugin: ``ModelCheckpoint``'s files become atomic,
  verified checkpoints (local or ``s3://``), and ``fit(ckpt_path=ckpt_io.resume_path(root))``
  resumes from the newest one every rank can load.
- ``ElasticResume``: spike detectors and the vote in the loop, in-process rollback with data
  skipping, preemption saves (exit 75), the drift report on resume.
- ``ResumableDataLoader`` (with ``use_distributed_sampler=False``): the data position is part of
  the checkpoint, so a run killed mid-epoch continues with the very next batch.

Each rank appends ``{"rank", "step", "loss"}`` per optimizer step to ``--loss-log``. Fault
injection for tests and demos (each fires once; markers in ``--fault-dir`` remember):
``--die-at-steps`` SIGKILLs ``--die-rank`` after those steps; ``--spike-at-step`` multiplies
``--spike-rank``'s loss by ``--spike-factor`` at that step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

import torch
from torch.utils.data import TensorDataset

try:  # the classic spelling (the pytorch-lightning distribution) ...
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.strategies import DDPStrategy
except ImportError:  # ... or the same classes from the lightning distribution
    import lightning.pytorch as pl  # type: ignore[no-redef]
    from lightning.pytorch.callbacks import ModelCheckpoint  # type: ignore[no-redef]
    from lightning.pytorch.strategies import DDPStrategy  # type: ignore[no-redef]

from elastic_resume import (
    EXIT_GAVE_UP,
    ElasticResumeError,
    GaveUpError,
    MaxRatio,
    NoCheckpointError,
    NonFinite,
    Plateau,
    ResumableDistributedSampler,
    RobustZScore,
    RollbackPolicy,
)
from elastic_resume.lightning import (
    ElasticCheckpointIO,
    ElasticResume,
    ResumableDataLoader,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Lightning DDP training with elastic-resume checkpoints")
    p.add_argument("--root", required=True, help="checkpoint directory (local path or s3://bucket/prefix)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps to train (Trainer max_steps)")
    p.add_argument("--save-every", type=int, default=5, help="ModelCheckpoint every_n_train_steps")
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--dataset-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=1, help="hidden layers (a bigger model for benchmarks)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout after each hidden layer (its masks draw "
                   "from torch's RNG, which ElasticResume saves and restores per rank)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--save-last", action="store_true", help="ModelCheckpoint(save_last=True)")
    p.add_argument("--loss-log")
    p.add_argument("--step-seconds", type=float, default=0.0, help="sleep this long per step (a slower model)")
    p.add_argument("--drift", default="warn", choices=["warn", "fail", "ignore"])
    p.add_argument("--checkpoint-io", default="elastic", choices=["elastic", "torch"],
                   help="torch: Lightning's default TorchCheckpointIO, no ElasticResume (benchmark baseline)")
    p.add_argument("--no-guard", action="store_true", help="ElasticCheckpointIO without the ElasticResume callback")
    p.add_argument("--die-at-steps", default="", help="comma-separated steps after which --die-rank SIGKILLs itself once")
    p.add_argument("--die-rank", type=int, default=1)
    p.add_argument("--fault-dir", default=".")
    g = p.add_argument_group("loss-spike guard")
    g.add_argument("--margin", type=int, default=3)
    g.add_argument("--skip-after", type=int, default=3)
    g.add_argument("--lr-scale", type=float, default=1.0)
    g.add_argument("--budget", type=int, default=3)
    g.add_argument("--spike-at-step", type=int)
    g.add_argument("--die-in-rollback", action="store_true", help="SIGKILL --die-rank in the middle of its first "
                   "rollback (after the anchor was loaded, before its re-commit)")
    g.add_argument("--spike-rank", type=int, default=1)
    g.add_argument("--nudge-param-at-step", type=int, help="after this optimizer step, --spike-rank adds 1e-3 to one "
                   "element of its copy of the first layer's weight (silent replica divergence; once)")
    g.add_argument("--spike-factor", type=float, default=1e4)
    g.add_argument("--accumulate", type=int, default=1, help="Trainer(accumulate_grad_batches=...); a spike "
                   "injected at a step lands in its first micro-batch")
    g.add_argument("--judge", default="global", choices=["global", "rank"])
    g.add_argument("--detector-window", type=int, help="judge with RobustZScore(window=N, z=8) instead of the default "
                   "MaxRatio (3x the highest loss of the last 128 steps)")
    g.add_argument("--plateau-above", type=float, help="add Plateau(above=...): roll back while the loss stays above this")
    g.add_argument("--plateau-after", type=int, default=10)
    g.add_argument("--plateau-window", type=int, default=4)
    g.add_argument("--high-loss-while-lr-above", type=float,
                   help="fault injection: add --high-loss-offset to the loss while the LR is above this")
    g.add_argument("--high-loss-offset", type=float, default=10.0)
    return p.parse_args(argv)


class Regression(pl.LightningModule):
    def __init__(self, hidden: int, lr: float, layers: int = 1, dropout: float = 0.0,
                 args: argparse.Namespace | None = None) -> None:
        super().__init__()
        self.save_hyperparameters("hidden", "lr", "layers", "dropout")
        blocks: list[torch.nn.Module] = [torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
        for _ in range(layers - 1):
            blocks += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
        self.net = torch.nn.Sequential(*blocks, torch.nn.Linear(hidden, 1))
        self.args = args
        self.example_input_array = torch.zeros(1, 16)  # lets ElasticResume settle DDP at 3+ ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        _, x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        a = self.args
        step = self.global_step + 1  # the optimizer step this batch is for
        if a is not None and a.spike_at_step == step and a.spike_rank == self.global_rank and once(a, f"spike-{step}"):
            loss = loss * a.spike_factor
        high = getattr(a, "high_loss_while_lr_above", None)
        if high is not None and self.trainer.optimizers[0].param_groups[0]["lr"] > high:
            loss = loss + a.high_loss_offset  # a constant: the gradients, hence training, are unchanged
        self.log("train_loss", loss)  # for ModelCheckpoint(monitor="train_loss")
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        a = self.args
        if a is None:
            return
        step = self.global_step
        if a.loss_log:
            with open(a.loss_log, "a") as f:
                f.write(json.dumps({"rank": self.global_rank, "step": step, "loss": float(outputs["loss"]),
                                    "t": time.monotonic()}) + "\n")
        if a.step_seconds:
            time.sleep(a.step_seconds)
        if getattr(a, "nudge_param_at_step", None) == step and self.global_rank == a.spike_rank and once(a, f"nudge-{step}"):
            with torch.no_grad():  # a bad chip's wrong number: this rank's replica alone changes
                next(self.net.parameters()).view(-1)[0] += 1e-3
        if self.global_rank == a.die_rank and str(step) in a.die_at_steps.split(",") and once(a, f"killed-at-{step}"):
            os.kill(os.getpid(), signal.SIGKILL)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.01 * s))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SyntheticData(pl.LightningDataModule):
    def __init__(self, dataset_size: int, batch_size: int, seed: int) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(1234)
        n = self.hparams.dataset_size
        x = torch.randn(n, 16, generator=g)
        y = (x @ torch.randn(16, 1, generator=g)).tanh() + 0.05 * torch.randn(n, 1, generator=g)
        self.dataset = TensorDataset(torch.arange(n), x, y)

    def train_dataloader(self) -> ResumableDataLoader:
        sampler = ResumableDistributedSampler(self.dataset, seed=self.hparams.seed)
        return ResumableDataLoader(self.dataset, sampler=sampler, batch_size=self.hparams.batch_size)


class DieInRollback(pl.Callback):
    """--die-in-rollback: SIGKILL --die-rank right after a rollback restored its anchor, before the
    re-commit (fault injection; set up after ElasticResume, whose guard it listens to)."""

    def __init__(self, guard: ElasticResume, args: argparse.Namespace) -> None:
        self.elastic, self.args = guard, args

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.args.die_in_rollback or self.elastic.guard is None:
            return

        def on_event(event: dict) -> None:
            if event["event"] == "rollback_restored" and trainer.global_rank == self.args.die_rank and \
                    once(self.args, "rollback"):
                os.kill(os.getpid(), signal.SIGKILL)
        self.elastic.guard.on_event = on_event


def once(args: argparse.Namespace, name: str) -> bool:
    marker = os.path.join(args.fault_dir, f".fault-{name}")
    if os.path.exists(marker):
        return False
    open(marker, "w").close()
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    pl.seed_everything(args.seed, verbose=False)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    world = int(os.environ.get("WORLD_SIZE", "1"))

    ckpt_io = ElasticCheckpointIO(async_save=args.async_save) if args.checkpoint_io == "elastic" else None
    detectors = [NonFinite(watch="loss"), MaxRatio() if args.detector_window is None else
                 RobustZScore(window=args.detector_window, z=8.0)]
    if args.plateau_above is not None:
        detectors.append(Plateau(above=args.plateau_above, after_steps=args.plateau_after, window=args.plateau_window))
    guard = None if args.no_guard or ckpt_io is None else ElasticResume(
        detectors=detectors, judge=args.judge,
        policy=RollbackPolicy(margin=args.margin, skip_after=args.skip_after, lr_scale=args.lr_scale, budget=args.budget),
        drift=args.drift,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=local_world, num_nodes=max(1, world // local_world),
        strategy=DDPStrategy(process_group_backend="gloo") if world > 1 else "auto",
        max_steps=args.steps, use_distributed_sampler=False, accumulate_grad_batches=args.accumulate,
        plugins=[ckpt_io] if ckpt_io else None,
        callbacks=[ModelCheckpoint(dirpath=args.root, every_n_train_steps=args.save_every, save_top_k=-1,
                                   save_last=args.save_last), *([guard, DieInRollback(guard, args)] if guard else [])],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    model = Regression(args.hidden, args.lr, args.layers, args.dropout, args)
    data = SyntheticData(args.dataset_size, args.batch_size, args.seed)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_io.resume_path(args.root) if ckpt_io else None)
    except GaveUpError:
        raise  # the rollback budget is spent: under elastic-resume launch this exits 76 by itself
    except NoCheckpointError as e:  # nothing loadable: a retry cannot fix it
        print(f"rank {trainer.global_rank}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_GAVE_UP
    except ElasticResumeError as e:
        if e.permanent:
            raise  # drift="fail", a bad setting: under elastic-resume launch the worker exits 78, not retried
        print(f"rank {trainer.global_rank}: error: {e}", file=sys.stderr, flush=True)  # storage trouble, a failed save
        return 1
    if trainer.global_rank == 0:
        print(f"lightning namespace: {pl.__name__} {pl.__version__}", flush=True)
        print(f"stopped at step {trainer.global_step}" + (" (preempted)" if guard and guard.exit_code else ""), flush=True)
    return guard.exit_code if guard else 0


if __name__ == "__main__":
    sys.exit(main())
