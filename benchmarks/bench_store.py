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

from benchmarks.common import WORK, drop_caches, timed
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 512])
    p.add_argument("--s3-sizes-mib", type=int, nargs="*", default=[64, 512])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--s3-reps", type=int, default=5)
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
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
