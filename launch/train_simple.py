"""A small, complete training script using elastic-resume: restore, train, save every N steps.

Runs as a plain process (``python launch/train_simple.py --root DIR``). Every step's loss goes to
``--loss-log`` (JSONL), so a run that was killed and resumed can be compared, step by step, with
one that never stopped. The data order is a function of (seed, epoch) and the position in the
epoch is part of the checkpoint, so a resume continues with exactly the batch that comes next.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from elastic_resume import EXIT_PREEMPTED, CheckpointManager


def synthetic_dataset(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="checkpoint root (directory or s3:// URL)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-log", help="append one JSON line per step: {step, loss}")
    p.add_argument("--keep-last", type=int, default=3)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x, y = synthetic_dataset(2048, 16, args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    progress = {"step": 0}

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "progress": progress}
    mgr = CheckpointManager(args.root, keep_last=args.keep_last)
    restored = mgr.restore(state)
    progress = state["progress"]
    if restored is not None:
        print(f"resumed from step {restored}", flush=True)

    batches_per_epoch = len(x) // args.batch_size
    log = open(args.loss_log, "a") if args.loss_log else None
    step = progress["step"]
    while step < args.steps:
        epoch, pos = divmod(step, batches_per_epoch)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        idx = order[pos * args.batch_size : (pos + 1) * args.batch_size]
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        progress["step"] = step  # current at every step, wherever a save happens
        if log:
            log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
            log.flush()
        if mgr.save_if_preempted(step, state):  # SIGUSR1/SIGTERM: save this step, exit 75, get requeued
            print(f"preempted, saved step {step}", flush=True)
            return EXIT_PREEMPTED
        if step % args.save_every == 0 or step == args.steps:
            mgr.save(step, state, metadata={"loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
    print(f"finished at step {step}, loss {loss.item():.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
