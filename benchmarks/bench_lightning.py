"""Lightning benchmark: what the integration costs a ``Trainer`` run, side by side in one run.

Every variant runs ``launch/train_lightning.py`` under ``elastic-resume launch`` with 2 ranks
(DDP, gloo, CPU), the same model and data, ``ModelCheckpoint(every_n_train_steps=N)``:

  torch         Lightning's default ``TorchCheckpointIO`` (torch.save), no callback: the baseline
  elastic       ``ElasticCheckpointIO`` (blocking), no callback
  elastic+async ``ElasticCheckpointIO(async_save=True)``, no callback
  guarded       ``ElasticCheckpointIO(async_save=True)`` + ``ElasticResume`` (detectors, vote)

From rank 0's per-step timestamps: the median time of a step without a save, and the stall of a
save step (its time minus that median). Printed as ratios to the baseline; variants are
interleaved over ``--repeats`` rounds so drift of this shared machine hits all of them alike.

Then (``--io``, on by default) the checkpoint files alone, in one process: the same Lightning
checkpoint dict (the MLP's weights and Adam state) saved and loaded through Lightning's default
``TorchCheckpointIO`` and through ``ElasticCheckpointIO`` (single file, integrity record written
and every byte checked on load), interleaved, medians.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(REPO, "launch", "train_lightning.py")

VARIANTS = {
    "torch": ["--checkpoint-io", "torch"],
    "elastic": ["--no-guard"],
    "elastic+async": ["--no-guard", "--async-save"],
    "guarded": ["--async-save"],
}


def run_variant(flags: list[str], args: argparse.Namespace, work: str) -> tuple[float, float, int]:
    """(median plain step s, median save stall s, checkpoint bytes) of one run."""
    run_dir = tempfile.mkdtemp(dir=work)
    log = os.path.join(run_dir, "loss.jsonl")
    cmd = [sys.executable, "-m", "elastic_resume.cli", "launch", "--standalone", "--nproc-per-node=2",
           "--er-no-summary", SCRIPT, "--root", os.path.join(run_dir, "ckpt"), "--loss-log", log,
           "--steps", str(args.steps), "--save-every", str(args.save_every), "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--batch-size", "4", "--dataset-size", "4096",
           # Without the example's dropout: the model the README's figures are for. With it, at
           # batch 4 each rank's own loss is noisy enough that per-rank z-score judging rolls back
           # falsely (budget of 3 spent by step 26 in one run): the case for judging the global loss.
           "--dropout", "0", *flags]
    env = dict(os.environ, PYTHONPATH=REPO, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if r.returncode != 0:
        raise SystemExit(f"variant {flags} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    times = {}
    with open(log) as f:
        for line in f:
            rec = json.loads(line)
            if rec["rank"] == 0:
                times[rec["step"]] = rec["t"]
    steps = sorted(times)
    durations = {s: times[s] - times[p] for p, s in itertools.pairwise(steps)}
    # Warm-up: the first steps build buffers and DDP's buckets; the first save allocates staging.
    plain = [d for s, d in durations.items() if s % args.save_every and s > 3]
    base = statistics.median(plain)
    stalls = [durations[s] - base for s in durations if s % args.save_every == 0 and s > args.save_every]
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(run_dir, "ckpt")) for f in fs)
    shutil.rmtree(run_dir, ignore_errors=True)
    return base, statistics.median(stalls), size // max(1, len(steps) // args.save_every)


def lightning_checkpoint(hidden: int, layers: int) -> dict:
    """What Lightning saves for the benchmark's model: weights, Adam state, loops, hparams."""
    import torch

    model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, hidden)).sum().backward()
    opt.step()
    return {"epoch": 0, "global_step": 100, "pytorch-lightning_version": "2.6.6", "state_dict": model.state_dict(),
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1, "completed": 0}}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "", "dirpath": "/tmp"}},
            "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
            "hyper_parameters": {"hidden": hidden, "layers": layers, "lr": 1e-3}}


def io_section(args: argparse.Namespace, work: str) -> None:
    """Save (blocking and the async stall) and load of one checkpoint file, ours / Lightning's default."""
    import time

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from elastic_resume.collectives import LocalGroup
    from elastic_resume.lightning import ElasticCheckpointIO

    checkpoint = lightning_checkpoint(args.hidden, args.layers)
    plain, ours, ours_async = TorchCheckpointIO(), ElasticCheckpointIO(group=LocalGroup()), \
        ElasticCheckpointIO(group=LocalGroup(), async_save=True)
    times: dict[str, list[float]] = {k: [] for k in ("save torch", "save elastic", "stall elastic async",
                                                     "load torch", "load elastic")}
    for i in range(args.io_repeats):
        for name, io in (("torch", plain), ("elastic", ours)):
            path = os.path.join(work, f"{name}-{i}.ckpt")
            t0 = time.perf_counter()
            io.save_checkpoint(checkpoint, path)
            times[f"save {name}"].append(time.perf_counter() - t0)
        path = os.path.join(work, f"async-{i}.ckpt")
        t0 = time.perf_counter()
        ours_async.save_checkpoint(checkpoint, path)
        times["stall elastic async"].append(time.perf_counter() - t0)
        ours_async.wait()
        for name, io in (("torch", plain), ("elastic", ours)):
            t0 = time.perf_counter()
            io.load_checkpoint(os.path.join(work, f"{name}-{i}.ckpt"))
            times[f"load {name}"].append(time.perf_counter() - t0)
        for name in ("torch", "elastic", "async"):
            os.remove(os.path.join(work, f"{name}-{i}.ckpt"))
    med = {k: statistics.median(v) for k, v in times.items()}
    size = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values()) * 3 / 2**20
    print(f"\ncheckpoint files, one process, about {size:.0f} MiB of tensors; medians of {args.io_repeats}")
    for what in ("save", "load"):
        print(f"{what:5s} torch {med[f'{what} torch'] * 1000:8.1f} ms  elastic {med[f'{what} elastic'] * 1000:8.1f} ms"
              f"  elastic/torch {med[f'{what} elastic'] / med[f'{what} torch']:5.2f}")
    print(f"async save stall {med['stall elastic async'] * 1000:8.1f} ms  "
          f"stall/torch save {med['stall elastic async'] / med['save torch']:5.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (the first is the baseline)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--io-only", action="store_true", help="only the checkpoint-file section")
    p.add_argument("--io-repeats", type=int, default=7)
    args = p.parse_args()
    chosen = {name: VARIANTS[name] for name in args.variants.split(",")}
    work = args.work or tempfile.mkdtemp(prefix="bench-lightning-")
    if args.io_only:
        io_section(args, work)
        return
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in chosen}
    for round_ in range(args.repeats):
        for name, flags in chosen.items():
            results[name].append(run_variant(flags, args, work))
            base, stall, size = results[name][-1]
            print(f"round {round_ + 1}/{args.repeats} {name:14s} step {base * 1000:7.1f} ms  save stall "
                  f"{stall * 1000:7.1f} ms  checkpoint {size / 2**20:6.1f} MiB", flush=True)
    med = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in results.items()}
    base_step, base_stall = next(iter(med.values()))
    print(f"\n2 ranks, gloo, CPU; {args.layers}x{args.hidden} MLP; medians of {args.repeats} interleaved runs")
    print(f"{'variant':14s} {'step':>9s} {'ratio':>6s} {'save stall':>11s} {'ratio':>6s}")
    for name, (step, stall) in med.items():
        print(f"{name:14s} {step * 1000:7.1f}ms {step / base_step:6.2f} {stall * 1000:9.1f}ms {stall / base_stall:6.2f}")
    io_section(args, work)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
