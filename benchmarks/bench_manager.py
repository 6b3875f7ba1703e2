"""Manager benchmark: what a checkpoint costs the training loop. Ratios measured side by side in
one run, over interleaved repetitions (absolute times on a shared machine are not comparable
between runs):

  async stall / synchronous save of the same state          goal <= 0.10
  async stall / floor (copying the state into touched memory) goal <= 1.5
  step time while a background save runs / without one      goal <= 1.05
  save time at 2 ranks / at 1 rank, same replicated model   goal clearly < 1

and, at 1, 2 and 4 ranks side by side with torch.distributed.checkpoint's ``async_save`` (the same
replicated model and Adam state on every rank, gloo, local disk):

  the stall of a background save (the call's return), ours and DCP's     goal: ours falls with N
  host memory a rank allocates for staging, ours and DCP's               goal: ours ~ 1/N of the state

Usage: python benchmarks/bench_manager.py [--mib 256] [--reps 5] [--ranks 1,2,4] [--only scaling]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import join_group, run_ranks
from elastic_resume import CheckpointManager

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


def _rank_save(rank: int, world: int, port: int, root: str, mib: int, reps: int, out: mp.Queue[float]) -> None:
    import torch.distributed as dist

    join_group(rank, world, port)
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


# -- background saves at N ranks, ours and DCP's ---------------------------------------------------
def _rss() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) << 10
    return fields["VmRSS"], fields["VmHWM"]


def _peak_growth(fn) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """(seconds fn() took, how far this process's resident memory peaked above where it started)."""
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux, root or own process)
        f.write("5")
    before, _ = _rss()
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    return seconds, _rss()[1] - before


def staging_bytes(mgr: CheckpointManager) -> int:
    """Host bytes the manager holds for staging (``staging_bytes`` since 0.2; the buffers before)."""
    if hasattr(mgr, "staging_bytes"):
        return int(mgr.staging_bytes)
    return sum(b.numel() * b.element_size() for b in mgr._stager.buffers)  # type: ignore[attr-defined]


def _rank_async(rank: int, world: int, port: int, root: str, mib: int, reps: int, out: mp.Queue[Any]) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    join_group(rank, world, port)
    state = make_state(mib)
    total = sum(t.numel() * t.element_size() for t in floor_copy(state, None))
    mgr = CheckpointManager(root, keep_last=2)
    # The first background save allocates (and touches) the staging: that growth is its memory.
    dist.barrier()
    _, ours_mem = _peak_growth(lambda: (mgr.save(0, state, blocking=False), mgr.wait()))
    ours_stall = []
    for rep in range(1, reps + 1):
        dist.barrier()
        t = time.perf_counter()
        mgr.save(rep, state, blocking=False)
        ours_stall.append(time.perf_counter() - t)
        mgr.wait()
    held = staging_bytes(mgr)
    mgr.close()
    sd = {"model": state["model"].state_dict(), "small": state["small"].state_dict(),
          "optimizer": state["optimizer"].state_dict()}
    dist.barrier()
    _, dcp_mem = _peak_growth(lambda: dcp.async_save(sd, checkpoint_id=f"{root}-dcp/0").result())
    dcp_stall = []
    for rep in range(1, reps + 1):
        dist.barrier()
        t = time.perf_counter()
        future = dcp.async_save(sd, checkpoint_id=f"{root}-dcp/{rep}")
        dcp_stall.append(time.perf_counter() - t)
        future.result()
    mine = {"ours_stall": statistics.median(ours_stall), "ours_mem": ours_mem, "ours_held": held,
            "dcp_stall": statistics.median(dcp_stall), "dcp_mem": dcp_mem, "total": total}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        out.put(everyone)
    dist.destroy_process_group()


def bench_scaling(mib: int, reps: int, worlds: list[int]) -> None:
    print(f"background save at N ranks (median over {reps} saves; per rank: max over ranks; memory: peak growth "
          "of the first save; ours held = staging buffers kept for the next save)")
    print(f"{'ranks':>5}  {'ours stall':>10}  {'DCP stall':>9}  {'ours/DCP':>8}  {'ours staging':>12}  {'ours held':>9}  "
          f"{'DCP staging':>11}  {'ours/DCP':>8}  {'ours held/state':>15}")
    for world in worlds:
        ranks = run_ranks(_rank_async, world, WORK, mib, reps)
        stall = max(r["ours_stall"] for r in ranks)
        dstall = max(r["dcp_stall"] for r in ranks)
        mem = max(r["ours_mem"] for r in ranks)
        held = max(r["ours_held"] for r in ranks)
        dmem = max(r["dcp_mem"] for r in ranks)
        total = ranks[0]["total"]
        print(f"{world:>5}  {stall * 1e3:>8.1f}ms  {dstall * 1e3:>7.1f}ms  {stall / dstall:>8.2f}  {mem / 2**20:>10.1f}Mi  "
              f"{held / 2**20:>7.1f}Mi  {dmem / 2**20:>9.1f}Mi  {mem / max(dmem, 1):>8.2f}  {held / total:>15.2f}",
              flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="state size (model + optimizer)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ranks", default="1,2,4", help="world sizes of the background-save comparison with DCP")
    p.add_argument("--only", choices=["scaling", "single"], help="run only one part")
    args = p.parse_args()
    os.makedirs(WORK, exist_ok=True)
    torch.set_num_threads(1)
    print(f"# manager benchmark  state {args.mib} MiB  torch {torch.__version__}")
    if args.only != "single":
        bench_scaling(args.mib, args.reps, [int(w) for w in args.ranks.split(",")])
    if args.only == "scaling":
        shutil.rmtree(WORK, ignore_errors=True)
        return 0
    r = bench_stall(args.mib, args.reps)
    print(f"async stall / sync save        {r['stall/sync']:.3f}   (stall {r['stall_s']:.3f}s, sync {r['sync_s']:.3f}s)")
    print(f"async stall / touched-copy floor {r['stall/floor']:.3f}   (floor {r['floor_s']:.3f}s)", flush=True)
    r = bench_step_slowdown(args.mib, args.reps)
    print(f"step during background save / quiet step {r['busy/quiet']:.3f}   "
          f"({r['step_busy_s'] * 1e3:.1f} ms vs {r['step_quiet_s'] * 1e3:.1f} ms, {r['busy_steps']} steps overlapped)",
          flush=True)
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
