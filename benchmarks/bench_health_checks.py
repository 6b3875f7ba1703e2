"""The guard's health checks (silent replica divergence, stragglers): what they cost, against the
same training without them.

A. In one process, a model of ``--hidden`` x ``--layers`` (AdamW, CPU): the median training step,
   the rotating digest one check takes (a quarter of the parameters at the default 4 slices),
   amortized over the default 10 steps, and the full digest a save's agreement takes, against
   that save's own foreground stall (staging the state for a background save); what the
   straggler clock's hooks add to a step (two gradient hooks, one optimizer pre-hook); and the
   replay check after a restart: reading ``--log-steps`` step lines once (rank 0, at the
   restart) and comparing one replayed step.
   Ratios are time with / without.
B. End to end: ``train_ddp.py --guard`` under ``elastic-resume launch`` (2 ranks, gloo), with the
   default checks and with ``--replica-check-every 0 --straggler-check-every 0``, run alternately
   ``--rounds`` times; the median step time of each (from the event log's step lines) and their
   ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import torch

from elastic_resume import replicas
from elastic_resume.checkpoint.saving import SaveJob, prepare
from elastic_resume.checkpoint.staging import Stager
from elastic_resume.events import read_events
from elastic_resume.spike.guard import GuardOptions
from elastic_resume.spike.replay import ReplayCheck, recorded_steps
from elastic_resume.spike.stragglers import BusyClock
from harness.processes import child_env

TRAIN = os.path.join(REPO, "launch", "train_ddp.py")


def median_seconds(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def in_process(hidden: int, layers: int, batch: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(m for _ in range(layers) for m in (torch.nn.Linear(hidden, hidden), torch.nn.ReLU())))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, hidden)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()
    for _ in range(3):
        step()
    options = GuardOptions()
    state = {"model": model, "optimizer": optimizer}
    rotation = replicas.Rotation(replicas.replicated_parameters(state), options.replica_slices)
    step_s = median_seconds(step, 15)
    check_s = median_seconds(lambda: rotation.next().value.item(), 4 * options.replica_slices)
    full_s = median_seconds(lambda: replicas.state_digests(state), 5)
    stager = Stager()
    stall_s = median_seconds(lambda: prepare(SaveJob(step=1, metadata={}, health={}, started=0.0), state, rank=0,
                                             world_size=1, stager=stager), 5)
    params = sum(p.numel() for p in model.parameters())
    per_step = check_s / options.replica_check_every
    print(f"A. model {params / 1e6:.1f} M parameters, step {step_s * 1000:.1f} ms (median)")
    print(f"   rotating digest: {check_s * 1000:.2f} ms per check (1/{options.replica_slices} of the model) every "
          f"{options.replica_check_every} steps = {per_step * 1000:.3f} ms per step; "
          f"step time with / without = {(step_s + per_step) / step_s:.4f}")
    print(f"   save agreement: full digest {full_s * 1000:.1f} ms beside the save's own foreground stall "
          f"{stall_s * 1000:.1f} ms (staging for a background save): stall with / without = "
          f"{(stall_s + full_s) / stall_s:.3f}")
    clock = BusyClock(state, state)
    first = next(model.parameters())

    def hooks_of_one_step() -> None:  # what the clock adds to a step: its three hook calls and busy()
        clock._on_grad(first)
        clock._on_grad(first)
        clock._on_optimizer_step(optimizer, (), {})
        clock.busy(1.0)
    n = 20000
    per_step = timeit.timeit(hooks_of_one_step, number=n) / n
    clock.close()
    print(f"   straggler clock: {per_step * 1e6:.1f} us per step (two gradient hooks, one optimizer pre-hook): "
          f"step time with / without = {(step_s + per_step) / step_s:.5f}")
    replay_cost(step_s)


def replay_cost(step_s: float, log_steps: int = 100_000) -> None:
    """The replay check: one read of the event log at the restart, then a comparison per step."""
    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "events.jsonl")
        with open(log, "w") as f:
            f.write(json.dumps({"ts": 0.0, "event": "launch_started", "run_id": "r"}) + "\n")
            for s in range(1, log_steps + 1):
                f.write(json.dumps({"ts": float(s), "event": "step", "rank": 0, "step": s, "loss": 1.0 / s,
                                    "grad_norm": 2.0 / s, "seconds": 0.1, "run_id": "r"}) + "\n")
        started = time.perf_counter()
        recorded = recorded_steps(log, log_steps - 200, run_id="r")
        read_s = time.perf_counter() - started
    check = ReplayCheck(log_steps - 200, recorded)
    steps = sorted(recorded)
    n = len(steps)
    started = time.perf_counter()
    for s in steps:
        check.observe(s, recorded[s][0], recorded[s][1])
    per_step = (time.perf_counter() - started) / n
    print(f"   replay check: the log read once at a restart ({log_steps} step lines) {read_s * 1000:.0f} ms; "
          f"{per_step * 1e6:.1f} us per replayed step: step time with / without = {(step_s + per_step) / step_s:.5f}")


def launched(tmp: str, name: str, hidden: int, steps: int, every: int) -> float:
    """Median step time of one launch; ``every``: both checks' interval (0: off)."""
    d = os.path.join(tmp, name)
    os.makedirs(d)
    log = os.path.join(d, "events.jsonl")
    cmd = [sys.executable, "-m", "elastic_resume.cli", "launch", "--standalone", "--nproc-per-node=2",
           f"--er-event-log={log}", TRAIN, "--root", os.path.join(d, "ckpt"), "--steps", str(steps),
           "--save-every", str(steps), "--guard", "--hidden", str(hidden), "--replica-check-every", str(every),
           "--straggler-check-every", str(every)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(None), timeout=900)
    if r.returncode:
        raise SystemExit(f"{name}: exit {r.returncode}: {r.stderr[-2000:]}")
    seconds = [e["seconds"] for e in read_events(log) if e["event"] == "step" and e.get("seconds")]
    return statistics.median(seconds[5:])


def end_to_end(hidden: int, steps: int, rounds: int) -> None:
    with_checks, without = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            with_checks.append(launched(tmp, f"on-{i}", hidden, steps, GuardOptions().replica_check_every))
            without.append(launched(tmp, f"off-{i}", hidden, steps, 0))
    on, off = statistics.median(with_checks), statistics.median(without)
    print(f"B. 2 ranks (gloo), hidden {hidden}, {steps} steps x {rounds} rounds each: median step "
          f"{on * 1000:.2f} ms with the checks, {off * 1000:.2f} ms without: with / without = {on / off:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--e2e-hidden", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    in_process(args.hidden, args.layers, args.batch)
    end_to_end(args.e2e_hidden, args.steps, args.rounds)


if __name__ == "__main__":
    main()
