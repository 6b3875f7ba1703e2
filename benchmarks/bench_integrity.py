"""Integrity benchmark: what the one definition of "loadable" costs, side by side in one run.

Every figure is a ratio of medians over interleaved repetitions taken in this one run (the
machine is shared and noisy, so absolute times are not comparable between runs):

  full check of a step (digests + bounded decode + assembly: what verify, latest and prune run)
    / digest-only pass over the same files (what verify did before: no decode)      goal <= 1.1
    / torch.load(weights_only=True) of the same state saved by torch.save             goal <  1.0
      (what a user checks a checkpoint with instead; it verifies nothing)
    / raw read of the same bytes
  save with retention (keep_last=3: every save prunes, proving what it keeps loadable)
    / save without retention (the difference is mostly deleting old steps, as before)
    share of the save spent judging loadability (the new work)                       goal <= 0.02
    share of the save spent deleting old steps (what any retention costs)
  bytes of data files read by a prune after a save, in the saving process               goal 0
      (the steps a process wrote itself are known loadable: prune reads no data file)

Usage: python benchmarks/bench_integrity.py [--sizes-mib 64 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import WORK, drop_caches, timed
from elastic_resume import CheckpointManager
from elastic_resume.checkpoint.layout import step_dir
from elastic_resume.checkpoint.store import CheckpointStore
from elastic_resume.storage import LocalStorage, open_storage


def make_state(size_mib: int) -> dict:
    n = size_mib * (1 << 20) // 4
    # Many tensors, as a model + optimizer has: the header and decode work is not trivial.
    parts = 256
    return {"model": {f"layer{i}.weight": torch.randn(n // parts) for i in range(parts)}, "step": 1}


def digest_only(store: CheckpointStore, step: int) -> None:
    manifest = store.read_manifest(step)
    for entry in manifest.files:
        store.read_file(manifest, entry, keep=False)


def raw_read(root: str, step: int) -> None:
    base = os.path.join(root, step_dir(step))
    for dirpath, _, files in os.walk(base):
        for name in files:
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass


class CountingReads:
    """Counts bytes read through LocalStorage streams (data files, not manifests)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._real = LocalStorage.open_stream

    def __enter__(self) -> CountingReads:
        counter = self

        def open_stream(storage, rel, expected_size=None):  # type: ignore[no-untyped-def]
            stream = counter._real(storage, rel, expected_size)
            counter.bytes += stream.size
            return stream

        LocalStorage.open_stream = open_stream  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        LocalStorage.open_stream = self._real  # type: ignore[method-assign]


def bench(size_mib: int, reps: int, cold: bool) -> dict[str, float]:
    root = os.path.join(WORK, f"integrity-{size_mib}")
    shutil.rmtree(root, ignore_errors=True)
    state = make_state(size_mib)
    CheckpointManager(root, keep_last=None).save(1, state)
    tpath = os.path.join(WORK, f"integrity-{size_mib}.pt")
    torch.save(state, tpath)
    times: dict[str, list[float]] = {k: [] for k in ("full", "digest", "torch_load", "raw")}
    CheckpointStore(open_storage(root)).check_loadable(1)  # warm-up: lazy imports, first-use paths
    torch.load(tpath, weights_only=True)
    for _ in range(reps):
        for name in times:  # interleaved, caches dropped before each where we can
            if cold:
                drop_caches()
            if name == "full":
                times[name].append(timed(lambda: CheckpointStore(open_storage(root)).check_loadable(1)))
            elif name == "digest":
                times[name].append(timed(lambda: digest_only(CheckpointStore(open_storage(root)), 1)))
            elif name == "torch_load":
                times[name].append(timed(lambda: torch.load(tpath, weights_only=True)))
            else:
                times[name].append(timed(lambda: raw_read(root, 1)))
    med = {k: statistics.median(v) for k, v in times.items()}

    # Saves with and without retention, interleaved, in one process each as training does. The
    # prune after each save is timed in two parts: judging loadability (the new work) and
    # deleting (what any retention pays, the same as before).
    with_root, without_root = root + "-keep3", root + "-keepall"
    for r in (with_root, without_root):
        shutil.rmtree(r, ignore_errors=True)
    with_mgr, without_mgr = CheckpointManager(with_root, keep_last=3), CheckpointManager(without_root, keep_last=None)
    save_with, save_without = [], []
    spent = {"judge": 0.0, "delete": 0.0}
    real_check, real_retire = CheckpointStore.check_loadable, CheckpointStore.retire

    def check(self, step, **kw):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return real_check(self, step, **kw)
        finally:
            spent["judge"] += time.perf_counter() - t

    def retire(self, step):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return real_retire(self, step)
        finally:
            spent["delete"] += time.perf_counter() - t

    CheckpointStore.check_loadable, CheckpointStore.retire = check, retire  # type: ignore[method-assign]
    try:
        with CountingReads() as reads:
            for step in range(1, 3 * reps + 4):
                save_with.append(timed(lambda: with_mgr.save(step, state)))
                save_without.append(timed(lambda: without_mgr.save(step, state)))
    finally:
        CheckpointStore.check_loadable, CheckpointStore.retire = real_check, real_retire  # type: ignore[method-assign]
    shutil.rmtree(with_root, ignore_errors=True)
    shutil.rmtree(without_root, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    os.unlink(tpath)
    total_with = sum(save_with)
    return {
        "full/digest": med["full"] / med["digest"],
        "full/torch_load": med["full"] / med["torch_load"],
        "full/raw": med["full"] / med["raw"],
        "full_s": med["full"],
        "save_keep3/save_keepall": statistics.median(save_with) / statistics.median(save_without),
        "judge/save": spent["judge"] / total_with,
        "delete/save": spent["delete"] / total_with,
        "prune_read_bytes": float(reads.bytes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    os.makedirs(WORK, exist_ok=True)
    cold = drop_caches()
    print(f"# integrity benchmark  torch {torch.__version__}  reads from "
          f"{'disk (page cache dropped)' if cold else 'page cache (cannot drop caches here)'}")
    print(f"{'size':>8}  {'full/digest-only':>16}  {'full/torch.load':>15}  {'full/raw read':>13}  "
          f"{'full s':>7}  {'save keep3/keep-all':>19}  {'judging/save':>12}  {'deleting/save':>13}  {'prune bytes read':>16}")
    for size in args.sizes_mib:
        r = bench(size, args.reps, cold)
        print(f"{size:>5}MiB  {r['full/digest']:>16.3f}  {r['full/torch_load']:>15.3f}  {r['full/raw']:>13.3f}  "
              f"{r['full_s']:>7.3f}  {r['save_keep3/save_keepall']:>19.3f}  {r['judge/save']:>12.4f}  "
              f"{r['delete/save']:>13.3f}  {int(r['prune_read_bytes']):>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
