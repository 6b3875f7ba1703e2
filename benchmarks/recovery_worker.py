"""The training process both sides of ``bench_launcher.py`` run: the same DDP model, data and
loop, checkpointed either with elastic-resume (``--mode er``: CheckpointManager, async saves
spread over the ranks, verified restore) or the way a plain torchrun script does it
(``--mode plain``: rank 0 ``torch.save`` to a temp file + rename, a barrier, ``torch.load`` at
start). Every rank appends timestamps to ``--timeline``: process start, process group ready, state
restored, and each step (the same ``step`` lines ``elastic-resume report`` reads)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

T_START = time.time()

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["er", "plain"], required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--timeline", required=True, help="JSONL file of timestamps")
    p.add_argument("--steps", type=int, default=10**9)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--step-seconds", type=float, default=0.0, help="sleep this long per step (a slower model)")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)

    def log(event: str, **kw) -> None:
        with open(args.timeline, "a") as f:
            f.write(json.dumps({"ts": time.time(), "event": event, "rank": rank, "pid": os.getpid(), **kw}) + "\n")

    log("process_start", at=T_START)
    log("pg_ready")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, 256))
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    progress = {"step": 0}
    state = {"model": model, "optimizer": opt, "progress": progress}
    log("model_ready")
    mgr = None
    if args.mode == "er":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from elastic_resume import EXIT_PREEMPTED, CheckpointManager

        mgr = CheckpointManager(args.root, keep_last=2)
        log("manager_ready")
        mgr.restore(state)
        progress = state["progress"]
    else:
        path = os.path.join(args.root, "ckpt.pt")
        if os.path.exists(path):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            progress["step"] = ckpt["step"]
    step = progress["step"]
    log("restored", step=step)
    last = time.monotonic()
    while step < args.steps:
        g = torch.Generator().manual_seed(step * 1000 + rank)
        x = torch.randn(64, 256, generator=g)
        loss = torch.nn.functional.mse_loss(ddp(x), x.roll(1, dims=1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.step_seconds:
            time.sleep(args.step_seconds)
        step += 1
        now = time.monotonic()
        if rank == 0:
            log("step", step=step, loss=loss.item(), seconds=round(now - last, 6))
        last = now
        progress["step"] = step
        if mgr is not None and mgr.save_if_preempted(step, state):  # a forwarded SIGUSR1/SIGTERM
            log("preemption_saved", step=step)
            mgr.close()
            dist.destroy_process_group()
            return EXIT_PREEMPTED
        if step % args.save_every == 0:
            if mgr is not None:
                mgr.save(step, state, blocking=False)
            else:
                if rank == 0:
                    os.makedirs(args.root, exist_ok=True)
                    tmp = os.path.join(args.root, "ckpt.pt.tmp")
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
                    os.replace(tmp, os.path.join(args.root, "ckpt.pt"))
                dist.barrier()
            last = time.monotonic()  # a save's stall is overhead, not a step's useful time
    if mgr is not None:
        mgr.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
