"""A distributed training script using elastic-resume (DDP; gloo on CPU, NCCL on GPUs).

Run it under ``torchrun`` (or ``elastic-resume launch``)::

    torchrun --nproc-per-node 2 launch/train_ddp.py --root /tmp/ckpt --steps 60

Everything that decides the next step's loss is in the checkpoint: model, optimizer, LR
scheduler, every RNG stream of every rank (dropout), and the sampler's global position. A run
killed at any point and restarted therefore continues bit-for-bit like a run that never stopped.
Each rank appends ``{"rank", "step", "loss", "samples"}`` per step to ``--loss-log``.

With ``--guard`` the loss-spike guard runs: local detectors, one vote per step, and in-process
rollback with data skipping (``--margin``, ``--skip-after``, ``--lr-scale``, ``--budget``); a run
that gives up exits 76.

Fault injection for tests and demos (each fires once; markers in ``--fault-dir`` remember):
``--die-at-steps 7,19`` SIGKILLs ``--die-rank`` at those steps; ``--spike-at-step``/``--nan-at-step``
corrupt one rank's loss; ``--poison-samples A:B`` makes those samples always blow the loss up;
``--die-in-rollback`` kills a rank in the middle of a rollback; ``--nudge-param-at-step`` changes one
element of one rank's parameters (silent replica divergence).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from elastic_resume import (
    EXIT_PREEMPTED,
    CheckpointManager,
    GaveUpError,
    NonFinite,
    PerRank,
    Plateau,
    ResumableDistributedSampler,
    RNGState,
    RobustZScore,
    RollbackPolicy,
    SpikeGuard,
    default_detectors,
    heartbeat,
    settle_ddp_buckets,
)
from elastic_resume.checkpoint.memory_tier import DEFAULT_MEMORY_KEEP


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
    p.add_argument("--memory-keep", type=int, default=DEFAULT_MEMORY_KEEP,
                   help="newest committed steps each rank keeps in RAM for rollbacks (0: off)")
    p.add_argument("--flip-memory-byte-at-step", type=int,
                   help="at this step --die-rank flips a byte of every file its memory tier holds (a bad DIMM)")
    p.add_argument("--stop-at-step", type=int, help="save and exit cleanly after this step")
    p.add_argument("--step-seconds", type=float, default=0.0, help="sleep this long per step (a slower model)")
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
    g = p.add_argument_group("loss-spike guard")
    g.add_argument("--guard", action="store_true", help="run the spike detectors, the vote and rollbacks")
    g.add_argument("--margin", type=int, default=3, help="roll back to a healthy checkpoint this many steps before the spike")
    g.add_argument("--skip-after", type=int, default=3, help="skip data through this many steps after the spike")
    g.add_argument("--no-skip", action="store_true", help="roll back without skipping data")
    g.add_argument("--lr-scale", type=float, default=1.0, help="multiply the LR by this after each rollback")
    g.add_argument("--budget", type=int, default=3, help="rollbacks allowed before giving up (exit 76)")
    g.add_argument("--restart-from-scratch", action="store_true", help="with no old-enough checkpoint, restart from step 0")
    g.add_argument("--detector-window", type=int, help="judge with RobustZScore over this window instead of the "
                   "library's default detectors")
    g.add_argument("--detector-z", type=float, default=8.0, help="RobustZScore's threshold (with --detector-window)")
    g.add_argument("--judge", default="global", choices=["global", "rank"],
                   help="judge the loss averaged over all ranks (default) or each rank's own")
    g.add_argument("--plateau-above", type=float, help="add Plateau(above=...): roll back while the loss stays above this")
    g.add_argument("--plateau-after", type=int, default=8, help="the plateau's after_steps")
    g.add_argument("--plateau-window", type=int, default=4, help="the plateau's smoothing window (steps)")
    g.add_argument("--plateau-lowest", action="store_true", help="a plateau rolls back to the lowest-loss checkpoint")
    g.add_argument("--high-loss-while-lr-above", type=float,
                   help="fault injection: add --high-loss-offset to the loss while the LR is above this")
    g.add_argument("--high-loss-offset", type=float, default=10.0)
    g.add_argument("--spike-at-step", type=int, help="multiply --spike-rank's loss by --spike-factor at this step (once)")
    g.add_argument("--spike-rank", type=int, default=1)
    g.add_argument("--spike-factor", type=float, default=1e4)
    g.add_argument("--nan-at-step", type=int, help="make --nan-rank's loss NaN at this step (once)")
    g.add_argument("--nan-rank", type=int, default=0)
    g.add_argument("--poison-samples", help="A:B: samples with index in [A, B) always produce a huge loss")
    g.add_argument("--poison-factor", type=float, default=1e3)
    g.add_argument("--no-shuffle", action="store_true")
    g.add_argument("--nondeterministic-at-step", type=int,
                   help="perturb rank 0's batch at this step by noise drawn from os.urandom: every run of the step "
                        "differs (a replay after a restart then shows replay_mismatch)")
    g.add_argument("--hang-in-data-at-step", type=int,
                   help="--die-rank blocks forever fetching the batch of this step (a deadlocked loader; once)")
    g.add_argument("--nudge-param-at-step", type=int,
                   help="after this step's optimizer step, --nudge-rank adds 1e-3 to one element of its copy of the "
                        "first layer's weight (silent replica divergence; once)")
    g.add_argument("--nudge-rank", type=int, default=1)
    g.add_argument("--straggler-rank", type=int, help="this rank sleeps --straggler-seconds before every forward "
                   "(a slow chip or loader: every other rank waits for it at the gradient all-reduce)")
    g.add_argument("--straggler-seconds", type=float, default=0.1)
    g.add_argument("--straggler-check-every", type=int, default=10)
    g.add_argument("--straggler-patience", type=int, default=3)
    g.add_argument("--exclude-stragglers", action="store_true",
                   help="a persistent straggler's node leaves the job (needs --nnodes MIN:MAX with a node to spare)")
    g.add_argument("--exclude-diverged", action="store_true",
                   help="a rank whose replica differs from the majority's: its node leaves the job (a node to spare)")
    g.add_argument("--replica-check-every", type=int, default=10,
                   help="digest a slice of the replicated parameters into the vote every this many steps (0: off)")
    g.add_argument("--die-in-rollback", action="store_true", help="SIGKILL --die-rank in the middle of its first rollback")
    return p.parse_args(argv)


def die_once(root: str, step: int, rank: int, args: argparse.Namespace) -> None:
    if rank == args.die_rank and str(step) in args.die_at_steps.split(",") and once(args, f"killed-at-{step}"):
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
    sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, seed=args.seed,
                                          shuffle=not args.no_shuffle)
    # A generator of the loader's own: creating an iterator then draws from it, not from the
    # global RNG whose exact position is part of the checkpoint.
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, generator=torch.Generator())

    model = torch.nn.Sequential(
        torch.nn.Linear(16, args.hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(args.hidden, 1)
    )
    ddp = DDP(model) if distributed else model
    if distributed:
        # With more than two ranks, DDP's first backward changes the order in which gradients
        # are summed; settle it now so a resumed run reproduces this one bit for bit.
        settle_ddp_buckets(ddp, x[:1])
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
        args.root, keep_last=args.keep_last, memory_keep=args.memory_keep,
        storage_options=parse_storage_options(args.storage_option),
        config={"lr": args.lr, "hidden": args.hidden, "batch_size": args.batch_size, "seed": args.seed},
        data_description=args.data_description, drift=args.drift, drift_allow=args.drift_allow,
    )
    guard = None
    if args.guard:
        policy = RollbackPolicy(margin=args.margin, skip_after=args.skip_after, skip_data=not args.no_skip,
                                lr_scale=args.lr_scale, budget=args.budget, restart_from_scratch=args.restart_from_scratch)
        detectors = default_detectors() if args.detector_window is None else [
            NonFinite(watch="loss"), NonFinite(watch="grad_norm"), RobustZScore(window=args.detector_window, z=args.detector_z)]
        if args.plateau_above is not None:
            detectors.append(Plateau(above=args.plateau_above, after_steps=args.plateau_after,
                                     window=args.plateau_window,
                                     rollback_to="lowest_loss" if args.plateau_lowest else "newest"))
        guard = SpikeGuard(mgr, state, sampler=sampler, detectors=detectors, policy=policy, judge=args.judge,
                           replica_check_every=args.replica_check_every,
                           straggler_check_every=args.straggler_check_every,
                           straggler_patience=args.straggler_patience, exclude_stragglers=args.exclude_stragglers,
                           exclude_diverged=args.exclude_diverged,
                           on_event=lambda e: fault_in_rollback(e, rank, args))
        restored = guard.start() or None
    else:
        restored = mgr.restore(state)
    progress = state["progress"]
    if restored is not None and rank == 0:
        print(f"resumed from step {restored} at world size {world}", flush=True)
    if args.restore_report:
        with open(args.restore_report, "a") as f:
            f.write(json.dumps({"rank": rank, "restored": restored}) + "\n")

    def batches():  # endless, from wherever the sampler stands (after a restore or a skip)
        while True:
            sampler.set_epoch(sampler.epoch if not sampler.epoch_finished else sampler.epoch + 1)
            yield from loader

    poison = tuple(int(v) for v in args.poison_samples.split(":")) if args.poison_samples else None
    log = open(args.loss_log, "a") if args.loss_log else None
    step = progress["step"]
    stream = batches()
    try:
        while step < args.steps:
            with heartbeat.section(heartbeat.Section.DATA):  # a loader that blocks is named as such
                idx, xb, yb = next(stream)
                if args.hang_in_data_at_step == step + 1 and rank == args.die_rank and once(args, f"hang-{step + 1}"):
                    wait_for_a_batch_that_never_comes()
            if poison:  # a stretch of bad data: these samples always blow the loss up
                bad = (idx >= poison[0]) & (idx < poison[1])
                yb = torch.where(bad[:, None], yb * args.poison_factor, yb)
            if args.straggler_rank == rank:
                time.sleep(args.straggler_seconds)
            if args.nondeterministic_at_step == step + 1 and rank == 0:
                noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
                xb = xb + 1e-3 * torch.randn(xb.shape, generator=noise)
            loss = torch.nn.functional.mse_loss(ddp(xb), yb)
            loss = inject(loss, step + 1, rank, args)
            lr = optimizer.param_groups[0]["lr"]
            if args.high_loss_while_lr_above is not None and lr > args.high_loss_while_lr_above:
                loss = loss + args.high_loss_offset  # a constant: the gradients, hence training, are unchanged
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9 if guard is None else 10.0 * guard.clip_scale)
            optimizer.step()
            scheduler.step()
            step += 1
            if args.nudge_param_at_step == step and rank == args.nudge_rank and once(args, f"nudge-{step}"):
                with torch.no_grad():  # a bad chip's wrong number: this rank's replica alone changes
                    model[0].weight.view(-1)[0] += 1e-3
            if log:
                log.write(json.dumps({"rank": rank, "world": world, "step": step, "epoch": sampler.epoch,
                                      "loss": loss.item(), "samples": idx.tolist(), "lr": lr,
                                      "rollbacks": guard.recovery.rollbacks if guard else 0}) + "\n")
                log.flush()
            die_once(args.root, step, rank, args)
            if args.flip_memory_byte_at_step == step and rank == args.die_rank:
                for held in mgr.memory.steps:
                    for buffer in mgr.memory.held_files(held).values():
                        buffer[buffer.numel() // 2] ^= 0x10
            if args.step_seconds:
                time.sleep(args.step_seconds)
            # Every field of the state is kept current at every step, not only on --save-every
            # steps: a preemption saves whatever step the vote lands on.
            state["progress"]["step"] = step
            save_now = step % args.save_every == 0 or step == args.steps or step == args.stop_at_step
            if guard is not None:
                outcome = guard.step(step, loss.item(), grad_norm=grad_norm.item(), save=save_now,
                                     blocking=not args.async_save)
                if outcome.rolled_back:
                    step = outcome.step
                    stream = batches()
                    continue
                if outcome.preempted:  # every rank saved this step; the launcher requeues
                    mgr.close()
                    print(f"rank {rank}: preempted, saved step {step}", flush=True)
                    return EXIT_PREEMPTED
            elif save_now:
                mgr.save(step, state, metadata={"loss": loss.item()}, blocking=not args.async_save)
            elif mgr.save_if_preempted(step, state, metadata={"loss": loss.item()}):
                mgr.close()  # every rank saved this step; the launcher requeues
                print(f"rank {rank}: preempted, saved step {step}", flush=True)
                return EXIT_PREEMPTED
            if step == args.stop_at_step:
                break
    except GaveUpError as e:
        mgr.close()
        print(f"rank {rank}: gave up: {e}", file=sys.stderr, flush=True)
        return GaveUpError.exit_code
    mgr.close()
    if rank == 0 and step >= args.steps:
        print(f"finished at step {step}, loss {loss.item():.6f}", flush=True)
    return 0


def wait_for_a_batch_that_never_comes() -> None:
    """A deadlocked data loader: blocked in C on a lock nobody releases."""
    threading.Event().wait()


def inject(loss: torch.Tensor, step: int, rank: int, args: argparse.Namespace) -> torch.Tensor:
    """Fault injection: a loss spike or a NaN on one rank at one step (once per run)."""
    for kind, at, who, factor in (("spike", args.spike_at_step, args.spike_rank, args.spike_factor),
                                  ("nan", args.nan_at_step, args.nan_rank, float("nan"))):
        if at == step and who == rank and once(args, f"{kind}-{step}"):
            return loss * factor
    return loss


def once(args: argparse.Namespace, name: str) -> bool:
    marker = os.path.join(args.fault_dir, f".fault-{name}")
    if os.path.exists(marker):
        return False
    open(marker, "w").close()
    return True


def fault_in_rollback(event: dict, rank: int, args: argparse.Namespace) -> None:
    """--die-in-rollback: SIGKILL this rank after the anchor was restored but before the
    recovered anchor is committed (the most delicate moment of a rollback)."""
    if args.die_in_rollback and event["event"] == "rollback_restored" and rank == args.die_rank and once(args, "rollback"):
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    try:
        code = main()
    finally:
        # On every way out (76 and 75 included): a gloo group left for interpreter teardown
        # can abort the process (SIGABRT), which torchrun would take for a crash and restart.
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)
