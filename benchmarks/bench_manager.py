"""Manager benchmark: what a checkpoint costs the training loop. Ratios measured side by side in
one run, over interleaved repetitions (absolute times on a shared machine are not comparable
between runs):

  async stall / synchronous save of the same state          goal <= 0.10
  async stall / floor (copying the state into touched memory) goal <= 1.5
  step time while a background save runs / without one      goal <= 1.05
  save time at 2 ranks / at 1 rank, same replicated model   goal clearly < 1

Usage: python benchmarks/bench_manager.py [--mib 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import run_ranks  # noqa: E402
from elastic_resume import CheckpointManager  # noqa: E402

WORK = os.path.abspath(os.environ.get("BENCH_DIR", ".bench"))


def make_state(mib: int) -> dict:
    """A model-like state: a handful of large and many small tensors, plus an optimizer."""
    n_big = 8
    per = (mib << 20) // 4 // (n_big * 3)  # params + two Adam moments
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(per)) for _ in range(n_big)])
    small = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(256)) for _ in range(64)])
    opt = torch.optim.Adam(list(model.parameters()) + list(small.parameters()))
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    return {"model": model, "small": small, "optimizer": opt}


def floor_copy(state: dict, buffers: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The least any snapshot can cost: copy every tensor into memory that is already touched."""
    tensors = [t for k in ("model", "small") for t in state[k].state_dict().values()]
    for s in state["optimizer"].state_dict()["state"].values():
        tensors += [v for v in s.values() if isinstance(v, torch.Tensor)]
    if buffers is None:
        buffers = [torch.empty_like(t).zero_() for t in tensors]
    for b, t in zip(buffers, tensors):
        b.copy_(t)
    return buffers


def bench_stall(mib: int, reps: int) -> dict[str, float]:
    root = tempfile.mkdtemp(dir=WORK)
    state = make_state(mib)
    mgr = CheckpointManager(os.path.join(root, "ckpt"), keep_last=2)
    mgr.save(0, state, blocking=False)  # first async save allocates and touches the buffers
    mgr.wait()
    buffers = floor_copy(state, None)
    stall, sync, floor = [], [], []
    for rep in range(1, reps + 1):
        t = time.perf_counter()
        floor_copy(state, buffers)
        floor.append(time.perf_counter() - t)
        t = time.perf_counter()
        mgr.save(2 * rep, state, blocking=False)
        stall.append(time.perf_counter() - t)
        mgr.wait()
        t = time.perf_counter()
        mgr.save(2 * rep + 1, state)
        sync.append(time.perf_counter() - t)
    mgr.close()
    shutil.rmtree(root, ignore_errors=True)
    return {
        "stall_s": statistics.median(stall), "sync_s": statistics.median(sync), "floor_s": statistics.median(floor),
        "stall/sync": statistics.median(stall) / statistics.median(sync),
        "stall/floor": statistics.median(stall) / statistics.median(floor),
    }


def bench_step_slowdown(mib: int, reps: int) -> dict[str, float]:
    """A compute-bound training step (one thread, as on a 2-core box with I/O beside it), timed
    while a background save is running and while none is."""
    root = tempfile.mkdtemp(dir=WORK)
    state = make_state(mib)
    mgr = CheckpointManager(os.path.join(root, "ckpt"), keep_last=2)
    a = torch.randn(384, 384)

    def step() -> float:
        t = time.perf_counter()
        for _ in range(8):
            a.matmul(a)
        return time.perf_counter() - t

    for _ in range(5):
        step()
    quiet, busy = [], []
    for rep in range(reps):
        quiet += [step() for _ in range(30)]
        mgr.save(rep, state, blocking=False)
        while mgr.save_in_progress:
            busy.append(step())
        mgr.wait()
    mgr.close()
    shutil.rmtree(root, ignore_errors=True)
    return {"step_quiet_s": statistics.median(quiet), "step_busy_s": statistics.median(busy),
            "busy/quiet": statistics.median(busy) / statistics.median(quiet), "busy_steps": len(busy)}


def _rank_save(rank: int, world: int, port: int, root: str, mib: int, reps: int, out: "mp.Queue[float]") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    state = make_state(mib)
    mgr = CheckpointManager(root, keep_last=2)
    times = []
    for rep in range(reps):
        dist.barrier()
        t = time.perf_counter()
        manifest = mgr.save(rep, state)
        times.append(time.perf_counter() - t)
    if rank == 0:
        assert manifest is not None
        per_rank = [sum(f.size for f in manifest.files if f.rank == r) for r in range(world)]
        out.put((statistics.median(times), max(per_rank) / manifest.total_bytes))
    dist.destroy_process_group()


def save_time(world: int, mib: int, reps: int) -> tuple[float, float]:
    return run_ranks(_rank_save, world, WORK, mib, reps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="state size (model + optimizer)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    os.makedirs(WORK, exist_ok=True)
    torch.set_num_threads(1)
    print(f"# manager benchmark  state {args.mib} MiB  torch {torch.__version__}")
    r = bench_stall(args.mib, args.reps)
    print(f"async stall / sync save        {r['stall/sync']:.3f}   (stall {r['stall_s']:.3f}s, sync {r['sync_s']:.3f}s)")
    print(f"async stall / touched-copy floor {r['stall/floor']:.3f}   (floor {r['floor_s']:.3f}s)", flush=True)
    r = bench_step_slowdown(args.mib, args.reps)
    print(f"step during background save / quiet step {r['busy/quiet']:.3f}   "
          f"({r['step_busy_s'] * 1e3:.1f} ms vs {r['step_quiet_s'] * 1e3:.1f} ms, {r['busy_steps']} steps overlapped)", flush=True)
    times: dict[int, list[float]] = {1: [], 2: []}
    share = {}
    for rep in range(2):
        for world in ((1, 2) if rep % 2 == 0 else (2, 1)):
            seconds, share[world] = save_time(world, args.mib, max(2, args.reps // 2))
            times[world].append(seconds)
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    print(f"save at 2 ranks / 1 rank       {t2 / t1:.3f}   ({t2:.3f}s vs {t1:.3f}s; the busiest rank writes "
          f"{share[2]:.0%} of the bytes at 2 ranks, {share[1]:.0%} at 1; both ranks share one disk here)")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
