"""A distributed training script using elastic-resume (DDP; gloo on CPU, NCCL on GPUs).

Run it under ``torchrun`` (or ``elastic-resume launch``)::

    torchrun --nproc-per-node 2 launch/train_ddp.py --root /tmp/ckpt --steps 60

Everything that decides the next step's loss is in the checkpoint: model, optimizer, LR
scheduler, every RNG stream of every rank (dropout), and the sampler's global position. A run
killed at any point and restarted therefore continues bit-for-bit like a run that never stopped.
Each rank appends ``{"rank", "step", "loss", "samples"}`` per step to ``--loss-log``.

Fault injection for tests and demos: ``--die-at-steps 7,19`` SIGKILLs ``--die-rank`` once at each
listed step (markers in ``--fault-dir`` remember which kills already happened).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from elastic_resume import CheckpointManager, PerRank, ResumableDistributedSampler, RNGState


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DDP training with elastic-resume checkpoints")
    p.add_argument("--root", required=True)
    p.add_argument("--steps", type=int, default=60, help="global optimizer steps to train")
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--dataset-size", type=int, default=512)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-log")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--stop-at-step", type=int, help="save and exit cleanly after this step")
    p.add_argument("--die-at-steps", default="", help="comma-separated steps at which --die-rank SIGKILLs itself once")
    p.add_argument("--die-rank", type=int, default=1)
    p.add_argument("--fault-dir", default=".", help="where markers of kills already done are kept")
    p.add_argument("--data-description", default="synthetic-regression-v1")
    p.add_argument("--drift", default="warn", choices=["warn", "fail", "ignore"])
    p.add_argument("--drift-allow", action="append", default=[])
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--restore-report", help="append {rank, restored} after restore (for tests)")
    p.add_argument("--ballast-mib", type=float, default=0.0,
                   help="per-rank ballast tensor of this size on --ballast-rank (fault injection: disk full)")
    p.add_argument("--ballast-rank", type=int, default=1)
    return p.parse_args(argv)


def die_once(root: str, step: int, rank: int, args: argparse.Namespace) -> None:
    if rank != args.die_rank or str(step) not in args.die_at_steps.split(","):
        return
    marker = os.path.join(args.fault_dir, f".killed-at-{step}")
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    g = torch.Generator().manual_seed(1234)
    x = torch.randn(args.dataset_size, 16, generator=g)
    y = (x @ torch.randn(16, 1, generator=g)).tanh() + 0.05 * torch.randn(args.dataset_size, 1, generator=g)
    dataset = TensorDataset(torch.arange(args.dataset_size), x, y)
    sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, seed=args.seed)
    # A generator of the loader's own: creating an iterator then draws from it, not from the
    # global RNG whose exact position is part of the checkpoint.
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, generator=torch.Generator())

    model = torch.nn.Sequential(
        torch.nn.Linear(16, args.hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(args.hidden, 1)
    )
    ddp = DDP(model) if distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.01 * s))
    progress = {"step": 0}
    state = {
        "model": model, "optimizer": optimizer, "scheduler": scheduler, "sampler": sampler,
        "progress": progress, "rng": RNGState(),
    }
    if args.ballast_mib:
        size = int(args.ballast_mib * (1 << 20)) if rank == args.ballast_rank else 1
        state["ballast"] = PerRank(torch.zeros(size, dtype=torch.uint8))
    from elastic_resume.cli import parse_storage_options

    mgr = CheckpointManager(
        args.root, keep_last=args.keep_last, storage_options=parse_storage_options(args.storage_option),
        config={"lr": args.lr, "hidden": args.hidden, "batch_size": args.batch_size, "seed": args.seed},
        data_description=args.data_description, drift=args.drift, drift_allow=args.drift_allow,
    )
    restored = mgr.restore(state)
    progress = state["progress"]
    if restored is not None and rank == 0:
        print(f"resumed from step {restored} at world size {world}", flush=True)
    if args.restore_report:
        with open(args.restore_report, "a") as f:
            f.write(json.dumps({"rank": rank, "restored": restored}) + "\n")

    log = open(args.loss_log, "a") if args.loss_log else None
    step = progress["step"]
    while step < args.steps:
        sampler.set_epoch(sampler.epoch if not sampler.epoch_finished else sampler.epoch + 1)
        for idx, xb, yb in loader:
            loss = torch.nn.functional.mse_loss(ddp(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if log:
                log.write(json.dumps({"rank": rank, "world": world, "step": step, "epoch": sampler.epoch,
                                      "loss": loss.item(), "samples": idx.tolist()}) + "\n")
                log.flush()
            die_once(args.root, step, rank, args)
            if step % args.save_every == 0 or step == args.steps or step == args.stop_at_step:
                progress["step"] = step
                mgr.save(step, state, metadata={"loss": loss.item()}, blocking=not args.async_save)
            if step == args.stop_at_step:
                mgr.close()
                if distributed:
                    dist.destroy_process_group()
                return 0
            if step >= args.steps:
                break
    mgr.close()
    if rank == 0:
        print(f"finished at step {step}", flush=True)
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
