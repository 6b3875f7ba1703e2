"""Memory-tier benchmark: what a rollback costs when the anchor is still in RAM. Ratios measured side
by side in one run, over interleaved repetitions (absolute times on a shared machine are not
comparable between runs), one rank, a model + Adam state on local disk:

  rollback from the memory tier / raw read of the same bytes from disk (cold)   goal <= 0.3
  rollback from the memory tier / raw read of the same bytes (page cache)       (for scale)
  rollback from the memory tier / the same rollback from storage (cold, warm)   goal well < 1
  blocking save with the tier / without it                                      (its cost)
  async stall with the tier / without it                                        goal ~ 1.0

"Raw read" opens each data file of the step and reads its bytes into memory: no digest, no decode,
no load into the model, the least a restore from disk can cost. A rollback is the whole
``restore(state, step=N)``: listing the manifest, checking every byte against its digests,
decoding and loading into the live model and optimizer. "Cold" evicts the step's files from the
page cache first (``posix_fadvise(DONTNEED)`` on each, after they are synced), so they come from
the disk.

Usage: python benchmarks/bench_memory_tier.py [--mib 256] [--reps 5]
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_manager import make_state
from benchmarks.common import WORK
from elastic_resume import CheckpointManager
from elastic_resume.collectives import LocalGroup


def step_files(root: str, step: int) -> list[str]:
    """The data files of ``step`` (every file under its directory but the manifest)."""
    top = os.path.join(root, f"step-{step:012d}")
    return [os.path.join(d, f) for d, _, names in os.walk(top) for f in names if f != "manifest.json"]


def evict(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths: list[str], buffers: dict[str, torch.Tensor]) -> float:
    """Seconds to read every byte of ``paths`` into preallocated, touched buffers."""
    started = time.perf_counter()
    for path in paths:
        view = memoryview(buffers[path].numpy())
        with open(path, "rb", buffering=0) as f:
            pos = 0
            while pos < len(view):
                n = f.readinto(view[pos:])
                if not n:
                    raise OSError(f"{path}: short read")
                pos += n
    return time.perf_counter() - started


def timed_restore(mgr: CheckpointManager, state: dict, step: int, tier: str) -> float:
    started = time.perf_counter()
    assert mgr.restore(state, step=step) == step
    seconds = time.perf_counter() - started
    assert mgr.last_restore_tier == tier, (mgr.last_restore_tier, tier)
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="state size (model + optimizer)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    os.makedirs(WORK, exist_ok=True)
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(dir=WORK)
    try:
        state = make_state(args.mib)
        held = CheckpointManager(os.path.join(work, "held"), group=LocalGroup(), keep_last=2, memory_keep=2)
        plain = CheckpointManager(os.path.join(work, "plain"), group=LocalGroup(), keep_last=2, memory_keep=0)
        times: dict[str, list[float]] = {k: [] for k in (
            "raw_cold", "raw_warm", "memory", "storage_cold", "storage_warm", "save_held", "save_plain",
            "stall_held", "stall_plain")}
        buffers: dict[str, torch.Tensor] = {}
        for rep in range(args.reps + 1):  # the first repetition warms up (pages, allocator)
            step = rep + 1
            got: dict[str, float] = {}
            order = (held, plain) if rep % 2 == 0 else (plain, held)
            for mgr in order:
                name = "held" if mgr is held else "plain"
                started = time.perf_counter()
                mgr.save(step, state)
                got[f"save_{name}"] = time.perf_counter() - started
            for mgr in order:
                name = "held" if mgr is held else "plain"
                started = time.perf_counter()
                mgr.save(1000 + step, state, blocking=False)
                got[f"stall_{name}"] = time.perf_counter() - started
                mgr.wait()
            # Step 1000+N is the newest now; the rollback goes back to N, which both still hold.
            held_bytes = held.memory.nbytes
            paths = step_files(plain.root, step)
            for path in paths:
                if path not in buffers or buffers[path].numel() != os.path.getsize(path):
                    buffers[path] = torch.zeros(os.path.getsize(path), dtype=torch.uint8)
            evict(paths)
            got["raw_cold"] = raw_read(paths, buffers)
            got["raw_warm"] = raw_read(paths, buffers)
            evict(paths)
            got["storage_cold"] = timed_restore(plain, state, step, "storage")
            got["storage_warm"] = timed_restore(plain, state, step, "storage")
            got["memory"] = timed_restore(held, state, step, "memory")
            for mgr in (held, plain):  # the rollback's new timeline starts at N
                mgr.retire_newer_than(step, reason="benchmark rollback")
            if rep:
                for k, v in got.items():
                    times[k].append(v)
        med = {k: statistics.median(v) for k, v in times.items()}
        size = sum(os.path.getsize(p) for p in step_files(plain.root, args.reps + 1)) / (1 << 20)
        print(f"# memory tier benchmark  state {args.mib} MiB ({size:.0f} MiB of data files)  "
              f"torch {torch.__version__}  {args.reps} reps, medians")
        print(f"rollback from memory / raw read from disk (cold)  {med['memory'] / med['raw_cold']:.3f}   "
              f"({med['memory'] * 1e3:.1f} ms vs {med['raw_cold'] * 1e3:.1f} ms)")
        print(f"rollback from memory / raw read (page cache)      {med['memory'] / med['raw_warm']:.3f}   "
              f"(raw warm {med['raw_warm'] * 1e3:.1f} ms)")
        print(f"rollback from memory / from storage (cold)        {med['memory'] / med['storage_cold']:.3f}   "
              f"(storage cold {med['storage_cold'] * 1e3:.1f} ms)")
        print(f"rollback from memory / from storage (page cache)  {med['memory'] / med['storage_warm']:.3f}   "
              f"(storage warm {med['storage_warm'] * 1e3:.1f} ms)")
        print(f"blocking save with the tier / without             {med['save_held'] / med['save_plain']:.3f}   "
              f"({med['save_held'] * 1e3:.1f} ms vs {med['save_plain'] * 1e3:.1f} ms)")
        print(f"async stall with the tier / without               {med['stall_held'] / med['stall_plain']:.3f}   "
              f"({med['stall_held'] * 1e3:.1f} ms vs {med['stall_plain'] * 1e3:.1f} ms)")
        print(f"host memory the tier holds before a rollback: {held_bytes / (1 << 20):.0f} MiB "
              f"(memory_keep={held.memory.keep} steps, plus spare buffers for the next save)")
        held.close()
        plain.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
