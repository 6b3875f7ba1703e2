"""Store benchmark: our save/restore against the raw operations on the same bytes, side by side.

Every figure is a ratio of medians over interleaved repetitions taken in this one run (the
machine is shared and noisy, so absolute times are not comparable between runs):

  local disk, for each state size
    save / (raw write + fsync)            goal <= 1.15
    save / (torch.save + fsync)           goal <  1.0
    restore / (raw read into memory)
  S3 (moto server on 127.0.0.1)
    save / one plain PUT of the same bytes    goal <= 1.1
    requests per save, split into data and commit/bookkeeping
  the data-file framing, a model-like state of many tensors
    save and restore in safetensors files / in the .ert files of 0.5   goal <= 1.0 each
  restore at N ranks (gloo on 127.0.0.1)
    restore at 2 ranks / torch.load of one file at 2 ranks (local disk)   goal <= 1.0 (0.5: 1.85)
    restore at 8 ranks / at 1 rank, same replicated state, on moto         goal <= 1.0
    requests per restore at 8 ranks (HEAD+GET of data files), parallel and every-rank-reads

Usage: python benchmarks/bench_store.py [--sizes-mib 64 512] [--reps 5] [--s3-sizes-mib 64 512]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import WORK, drop_caches, join_group, spawn_ranks, timed
from elastic_resume import CheckpointManager
from elastic_resume.storage import tensor_bytes


def raw_write(path: str, tensor: torch.Tensor) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = tensor_bytes(tensor)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save(path: str, state: dict) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def raw_read(path: str) -> torch.Tensor:
    size = os.path.getsize(path)
    buf = torch.empty(size, dtype=torch.uint8)
    view = tensor_bytes(buf)
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < size:
            pos += f.readinto(view[pos:])
    return buf


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(a) / statistics.median(b)


def min_ratio(a: list[float], b: list[float]) -> float:
    """Ratio of the fastest runs: the least disturbed estimate on a noisy shared disk."""
    return min(a) / min(b)


def bench_local(size_mib: int, reps: int, cold: bool) -> dict[str, float]:
    n = size_mib * (1 << 20) // 4
    state = {"w": torch.randn(n)}
    root = os.path.join(WORK, f"local-{size_mib}")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    mgr = CheckpointManager(os.path.join(root, "ckpt"), keep_last=None)
    times: dict[str, list[float]] = {k: [] for k in ("save", "raw_write", "torch_save", "restore", "raw_read")}
    raw_path, torch_path = os.path.join(root, "raw.bin"), os.path.join(root, "torch.pt")
    for rep in range(reps):
        order = [("save", lambda: mgr.save(rep, state)),
                 ("raw_write", lambda: raw_write(raw_path, state["w"])),
                 ("torch_save", lambda: torch_save(torch_path, state))]
        random.Random(rep).shuffle(order)  # interleave so drift in the machine's speed hits all sides
        for name, fn in order:
            times[name].append(timed(fn))
        reads = [("restore", lambda: mgr.restore({"w": None}, step=rep)), ("raw_read", lambda: raw_read(raw_path))]
        if rep % 2:
            reads.reverse()
        for name, fn in reads:
            if cold:
                drop_caches()
            times[name].append(timed(fn))
        os.remove(torch_path)
        os.remove(raw_path)  # every write, ours included, goes to a new file
    shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "save_s": med["save"], "raw_write_s": med["raw_write"], "torch_save_s": med["torch_save"],
        "restore_s": med["restore"], "raw_read_s": med["raw_read"],
        "save/raw_write": median_ratio(times["save"], times["raw_write"]),
        "save/raw_write min": min_ratio(times["save"], times["raw_write"]),
        "save/torch_save min": min_ratio(times["save"], times["torch_save"]),
        "restore/raw_read min": min_ratio(times["restore"], times["raw_read"]),
        "save/torch_save": median_ratio(times["save"], times["torch_save"]),
        "restore/raw_read": median_ratio(times["restore"], times["raw_read"]),
    }


@contextlib.contextmanager
def moto_server():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from harness.processes import stop_process
    from harness.s3 import S3_ENV, make_bucket, start_moto

    os.environ.update(S3_ENV)
    proc, endpoint = start_moto()
    try:
        yield endpoint, make_bucket(endpoint)
    finally:
        stop_process(proc)


def bench_s3(size_mib: int, reps: int, endpoint: str, bucket: str) -> dict[str, float]:
    import boto3

    n = size_mib * (1 << 20) // 4
    state = {"w": torch.randn(n)}
    payload = bytes(tensor_bytes(state["w"]))
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    mgr = CheckpointManager(f"s3://{bucket}/bench-{size_mib}", storage_options={"endpoint_url": endpoint}, keep_last=None)
    calls: Counter[str] = Counter()
    fs = mgr.storage.fs  # type: ignore[attr-defined]
    original = fs._call_s3

    complete_s: list[float] = []

    async def counting(method, *a, **kw):  # type: ignore[no-untyped-def]
        calls[method] += 1
        t = time.perf_counter()
        try:
            return await original(method, *a, **kw)
        finally:
            if method == "complete_multipart_upload":
                complete_s.append(time.perf_counter() - t)

    fs._call_s3 = counting
    times: dict[str, list[float]] = {"save": [], "put": []}
    for rep in range(reps):
        order = [("save", lambda: mgr.save(rep, state)),
                 ("put", lambda: client.put_object(Bucket=bucket, Key=f"plain-{size_mib}", Body=payload))]
        if rep % 2:
            order.reverse()
        for name, fn in order:
            times[name].append(timed(fn))
    data_calls = calls["upload_part"] + calls["create_multipart_upload"] + calls["complete_multipart_upload"]
    small = sum(calls.values()) - data_calls
    if data_calls == 0:  # a state small enough for one PUT: that PUT is the data, the rest is commit
        small -= reps
    return {
        "save_s": statistics.median(times["save"]), "put_s": statistics.median(times["put"]),
        "save/put": median_ratio(times["save"], times["put"]),
        # The server's share: moto re-copies every part on CompleteMultipartUpload (real S3
        # only stitches metadata), so this is the ratio with that emulator artefact removed.
        "save_minus_complete/put": (statistics.median(times["save"]) - (statistics.median(complete_s) if complete_s else 0.0))
        / statistics.median(times["put"]),
        "requests_per_save": sum(calls.values()) / reps,
        "small_requests_per_save": small / reps,
        "calls": dict(calls),
    }


def model_like_state(mib: int) -> dict:
    """~``mib`` MiB over many tensors of a transformer's sizes (and their Adam moments), where the
    framing of a file (its header, its alignment) weighs more than in one big tensor."""
    torch.manual_seed(0)
    width = 256
    per_layer = 4 * width * width * 4 * 3  # 4 matrices, fp32, with two moments each
    layers = max(1, mib * (1 << 20) // per_layer)
    model = {f"layers.{i}.{n}": torch.randn(width, width) for i in range(layers) for n in ("q", "k", "v", "o")}
    model.update({f"layers.{i}.norm": torch.ones(width) for i in range(layers)})
    moments = {i: {"exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t), "step": torch.tensor(1.0)}
               for i, t in enumerate(model.values())}
    return {"model": model, "optimizer": {"state": moments, "param_groups": [{"lr": 1e-3, "params": list(moments)}]}}


def bench_formats(mib: int, reps: int, cold: bool) -> dict[str, float]:
    """Save and restore with today's safetensors framing and with 0.5's .ert framing, interleaved."""
    from benchmarks import legacy_format
    from elastic_resume.checkpoint import saving

    state = model_like_state(mib)
    root = os.path.join(WORK, f"formats-{mib}")
    shutil.rmtree(root, ignore_errors=True)
    mgrs = {"safetensors": CheckpointManager(os.path.join(root, "st"), keep_last=None),
            "ert": CheckpointManager(os.path.join(root, "ert"), keep_last=None)}
    encoders = {"safetensors": saving.encode, "ert": legacy_format.encode}
    times: dict[str, list[float]] = {f"{k} {op}": [] for k in mgrs for op in ("save", "restore")}
    try:
        for rep in range(reps):
            kinds = list(mgrs) if rep % 2 == 0 else list(mgrs)[::-1]
            for kind in kinds:
                saving.encode = encoders[kind]
                times[f"{kind} save"].append(timed(lambda: mgrs[kind].save(rep, state)))
            saving.encode = encoders["safetensors"]
            for kind in kinds:
                if cold:
                    drop_caches()
                target = {"model": None, "optimizer": None}
                times[f"{kind} restore"].append(timed(lambda: mgrs[kind].restore(target, step=rep)))
    finally:
        saving.encode = encoders["safetensors"]
        shutil.rmtree(root, ignore_errors=True)
    return {"save": median_ratio(times["safetensors save"], times["ert save"]),
            "restore": median_ratio(times["safetensors restore"], times["ert restore"]),
            "save min": min_ratio(times["safetensors save"], times["ert save"]),
            "restore min": min_ratio(times["safetensors restore"], times["ert restore"]),
            "tensors": float(sum(1 for _ in _tensors(state)))}


def _tensors(tree):  # type: ignore[no-untyped-def]
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _tensors(v)


def _rank_restore(rank: int, world: int, port: int, local: str, url: str | None, options: dict, save_world: int,
                  mib: int, reps: int, parallel: bool | str, out) -> None:  # type: ignore[no-untyped-def]
    """A rank of a restore benchmark: the median over ``reps`` of the slowest rank's restore
    time, and (with ``url`` None) of ``torch.load`` of one file holding the same state."""
    import torch.distributed as dist

    join_group(rank, world, port)
    root = url or local
    state = model_like_state(mib)
    mgr = CheckpointManager(root, storage_options=options, keep_last=None, parallel_restore=parallel)
    times, loads = [], []
    plain = os.path.join(local + "-plain", f"rank{rank}.pt")
    if url is None:
        os.makedirs(os.path.dirname(plain), exist_ok=True)
        torch.save(state, plain)
    for _ in range(reps):
        target = {"model": None, "optimizer": None}
        dist.barrier()
        t = time.perf_counter()
        mgr.restore(target, step=1)
        took = torch.tensor([time.perf_counter() - t])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        times.append(float(took))
        if url is None:
            dist.barrier()
            t = time.perf_counter()
            torch.load(plain, weights_only=True)
            took = torch.tensor([time.perf_counter() - t])
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            loads.append(float(took))
    if rank == 0:
        out.put((statistics.median(times), statistics.median(loads) if loads else None))
    dist.destroy_process_group()


def _rank_save(rank: int, world: int, port: int, local: str, url: str | None, options: dict, mib: int,
               out) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    join_group(rank, world, port)
    CheckpointManager(url or local, storage_options=options, keep_last=None).save(1, model_like_state(mib))
    if rank == 0:
        out.put(None)
    dist.destroy_process_group()


def bench_restore_at_2(mib: int, reps: int) -> dict[str, float]:
    """Local disk: restore at 2 ranks / ``torch.load`` of one file per rank (as a plain torchrun
    script restores), with the default (every rank reads every file: the page cache serves the
    second) and with the parallel read (each reads half, they exchange over gloo)."""
    root = os.path.join(WORK, "restore-2")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    local = os.path.join(root, "ckpt")
    _spawn(_rank_save, 2, local, None, {}, mib)
    out = {}
    for name, parallel in (("default", "auto"), ("parallel", True)):
        restore_s, load_s = _spawn(_rank_restore, 2, local, None, {}, 2, mib, reps, parallel)
        out[f"{name} restore_s"], out[f"{name} torch_load_s"] = restore_s, load_s
        out[f"{name} restore/torch_load"] = restore_s / load_s
    shutil.rmtree(root, ignore_errors=True)
    return out


def _spawn(target, world: int, local: str, url: str | None, options: dict, *args):  # type: ignore[no-untyped-def]
    return spawn_ranks(target, world, local, url, options, *args, timeout=900)


def bench_restore_scaling(mib: int, reps: int, world: int) -> dict[str, float]:
    """On moto: a state saved at ``world`` ranks, restored at ``world`` ranks (parallel, and every
    rank reading every file) and at 1 rank; requests per restore from the server's own log."""
    from harness.processes import stop_process
    from harness.s3 import S3_ENV, make_bucket, requests_in_log, start_moto

    os.environ.update(S3_ENV)
    root = os.path.join(WORK, "restore-scaling")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    log = os.path.join(root, "moto.log")
    proc, endpoint = start_moto(request_log=log)
    try:
        url, options = f"s3://{make_bucket(endpoint)}/run", {"endpoint_url": endpoint}
        _spawn(_rank_save, world, os.path.join(root, "x"), url, options, mib)

        def requests() -> int:
            return sum(requests_in_log(log, m, "/step-000000000001/") for m in ("GET", "HEAD"))

        out: dict[str, float] = {}
        for name, n, parallel in (("parallel", world, True), ("every rank reads", world, False), ("one rank", 1, True)):
            before = requests()
            out[f"{name} s"] = _spawn(_rank_restore, n, os.path.join(root, "x"), url, options, world, mib, reps,
                                      parallel)[0]
            out[f"{name} requests"] = (requests() - before) / reps
        return out
    finally:
        stop_process(proc)
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mib", type=int, nargs="*", default=[64, 512])
    p.add_argument("--s3-sizes-mib", type=int, nargs="*", default=[64, 512])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--s3-reps", type=int, default=5)
    p.add_argument("--format-mib", type=int, default=256, help="state size for the framing comparison (0: skip)")
    p.add_argument("--restore-mib", type=int, default=128, help="state size for the restore at N ranks (0: skip)")
    p.add_argument("--restore-world", type=int, default=8)
    args = p.parse_args()
    os.makedirs(WORK, exist_ok=True)
    torch.set_num_threads(1)
    cold = drop_caches()
    source = "disk (page cache dropped)" if cold else "page cache (cannot drop caches here)"
    print(f"# store benchmark  torch {torch.__version__}  reads from {source}")
    print("ratios: median of repetitions (min of repetitions); seconds: medians")
    print(f"{'size':>8}  {'save/raw_write':>15}  {'save/torch.save':>15}  {'restore/raw_read':>16}  "
          f"{'save s':>7}  {'raw s':>7}  {'torch s':>7}  {'restore s':>9}")
    for size in args.sizes_mib:
        r = bench_local(size, args.reps, cold)
        cell = lambda k: f"{r[k]:.2f} ({r[k + ' min']:.2f})"  # noqa: E731
        print(f"{size:>5}MiB  {cell('save/raw_write'):>15}  {cell('save/torch_save'):>15}  {cell('restore/raw_read'):>16}  "
              f"{r['save_s']:>7.3f}  {r['raw_write_s']:>7.3f}  {r['torch_save_s']:>7.3f}  {r['restore_s']:>9.3f}", flush=True)
    if args.s3_sizes_mib:
        with moto_server() as (endpoint, bucket):
            print(f"\n# S3 (moto server on 127.0.0.1)\n{'size':>8}  {'save/PUT':>9}  {'(-complete)/PUT':>15}  "
                  f"{'save s':>7}  {'PUT s':>7}  "
                  f"{'requests/save':>13}  {'commit+bookkeeping requests':>27}")
            for size in args.s3_sizes_mib:
                r = bench_s3(size, args.s3_reps, endpoint, bucket)
                print(f"{size:>5}MiB  {r['save/put']:>9.3f}  {r['save_minus_complete/put']:>15.3f}  "
                      f"{r['save_s']:>7.3f}  {r['put_s']:>7.3f}  "
                      f"{r['requests_per_save']:>13.1f}  {r['small_requests_per_save']:>27.1f}   {r['calls']}", flush=True)
    if args.format_mib:
        r = bench_formats(args.format_mib, args.reps, cold)
        print(f"\n# data-file framing, {args.format_mib} MiB over {int(r['tensors'])} tensors (medians, min)\n"
              f"  save in safetensors files / in .ert files        {r['save']:.3f} ({r['save min']:.3f})   (goal <= 1.0)\n"
              f"  restore from safetensors files / from .ert files {r['restore']:.3f} ({r['restore min']:.3f})   "
              "(goal <= 1.0)", flush=True)
    if args.restore_mib:
        r = bench_restore_at_2(args.restore_mib, args.reps)
        print(f"\n# restore at 2 ranks, {args.restore_mib} MiB, local disk (slowest rank, medians)")
        for name in ("default", "parallel"):
            print(f"  restore ({name}) / torch.load of one file per rank  {r[f'{name} restore/torch_load']:.3f}   "
                  f"({r[f'{name} restore_s']:.3f} s / {r[f'{name} torch_load_s']:.3f} s; goal <= 1.0; 0.5: 1.85)",
                  flush=True)
        r = bench_restore_scaling(args.restore_mib, max(1, args.s3_reps // 2), args.restore_world)
        w = args.restore_world
        print(f"\n# restore on moto, {args.restore_mib} MiB saved at {w} ranks (slowest rank, medians)\n"
              f"  at {w} ranks, parallel / at 1 rank             {r['parallel s'] / r['one rank s']:.3f}   (goal <= 1.0)\n"
              f"  at {w} ranks, every rank reads / at 1 rank     {r['every rank reads s'] / r['one rank s']:.3f}\n"
              f"  requests per restore at {w} ranks: parallel {r['parallel requests']:.0f}, every rank reads "
              f"{r['every rank reads requests']:.0f}, at 1 rank {r['one rank requests']:.0f} "
              f"(goal <= {w} x files per rank)", flush=True)
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
