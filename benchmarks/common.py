"""Helpers shared by the benchmarks: cache dropping and running a function on N gloo ranks."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

#: Where benchmarks write their checkpoints (``BENCH_DIR`` overrides).
WORK = os.path.abspath(os.environ.get("BENCH_DIR", ".bench"))


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def drop_caches() -> bool:
    """Evict the page cache where allowed (root on a real kernel), so reads hit the disk."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def join_group(rank: int, world: int, port: int) -> None:
    """In a rank started by :func:`run_ranks`: one thread for torch, the gloo process group
    over 127.0.0.1, and the same seed everywhere (the replicated state is identical)."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)


def spawn_ranks(target: Callable[..., None], world: int, *args: Any, timeout: float = 600) -> Any:
    """Start ``world`` spawned processes running ``target(rank, world, port, *args, queue)``;
    return what rank 0 puts on the queue."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from harness.processes import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=120)


def run_ranks(target: Callable[..., None], world: int, work: str, *args: Any) -> Any:
    """:func:`spawn_ranks` with a fresh checkpoint root: ``target(rank, world, port, root, *args,
    queue)``."""
    root = tempfile.mkdtemp(dir=work)
    try:
        return spawn_ranks(target, world, os.path.join(root, "ckpt"), *args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
