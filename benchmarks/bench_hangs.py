"""Hang detection: what it costs per step, and how long a stopped worker takes to be found and the
run to train again, against what plain torchrun does (wait for the process group's timeout).

A. Cost: ``heartbeat.beat(step)`` (one per step) and a ``data`` section around a batch fetch (two
   records), in microseconds, against a step of ``--step-ms``.
B. A worker SIGSTOPped mid-run under ``elastic-resume launch`` (2 ranks, gloo, ``train_ddp.py
   --guard``): seconds from the SIGSTOP to ``hang_detected``, and to the first step after the
   restart, with the learned default (``auto``) and with ``--er-hang-timeout 5``. Plain torchrun
   is not run: its survivors wait in the collective until the process group's timeout (torch's
   default: 30 min for gloo, 10 min for NCCL), which is the figure printed beside them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from elastic_resume import heartbeat
from elastic_resume.events import read_events
from harness.processes import child_env, children

TRAIN = os.path.join(REPO, "launch", "train_ddp.py")
GLOO_DEFAULT_TIMEOUT_S = 1800.0


def cost(step_ms: float) -> None:
    with tempfile.TemporaryDirectory() as d:
        os.environ["ER_HEARTBEAT_DIR"], os.environ["LOCAL_RANK"] = d, "0"
        heartbeat._reset_for_tests()
        n = 20000
        beat = timeit.timeit(lambda: heartbeat.beat(7), number=n) / n * 1e6

        def fetch() -> None:
            with heartbeat.section(heartbeat.Section.DATA):
                pass
        section = timeit.timeit(fetch, number=n) / n * 1e6
        del os.environ["ER_HEARTBEAT_DIR"]
        heartbeat._reset_for_tests()
    per_step = beat + section
    print(f"A. per step: beat {beat:.1f} us + data section {section:.1f} us = {per_step:.1f} us, "
          f"{per_step / (step_ms * 1000) * 100:.3f}% of a {step_ms:g} ms step")


def rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        return int(env[b"RANK"])
    except (OSError, KeyError, ValueError):
        return None


def stopped_worker(timeout: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as work:
        events = os.path.join(work, "events.jsonl")
        cmd = [sys.executable, "-m", "elastic_resume.cli", "launch", "--standalone", "--nproc-per-node=2",
               "--monitor-interval=0.2", "--max-restarts=2", f"--er-hang-timeout={timeout}", f"--er-event-log={events}",
               TRAIN, "--root", os.path.join(work, "ckpt"), "--fault-dir", work, "--steps", "100000",
               "--save-every", "20", "--guard", "--step-seconds", "0.05"]
        launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(),
                                    start_new_session=True)
        try:
            def wait(pred, limit: float) -> dict:
                deadline = time.monotonic() + limit
                while time.monotonic() < deadline:
                    found = [e for e in (read_events(events) if os.path.exists(events) else []) if pred(e)]
                    if found:
                        return found[0]
                    time.sleep(0.1)
                raise SystemExit(f"timed out waiting in {work}")

            wait(lambda e: e["event"] == "step" and e["step"] >= 30, 300)
            victim = next(p for p in children(launcher.pid) if rank_of(p) == 1)
            os.kill(victim, signal.SIGSTOP)
            t0 = time.time()
            hang = wait(lambda e: e["event"] == "hang_detected", 900)
            first = wait(lambda e: e["event"] == "step" and e["ts"] > hang["ts"], 300)
            return hang["ts"] - t0, first["ts"] - t0
        finally:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step-ms", type=float, default=100.0, help="the step the per-step cost is compared with")
    p.add_argument("--skip-stop", action="store_true", help="only the per-step cost")
    args = p.parse_args()
    cost(args.step_ms)
    if args.skip_stop:
        return 0
    print(f"\nB. a worker SIGSTOPped (seconds from the SIGSTOP; plain torchrun waits for the process group's "
          f"timeout, {GLOO_DEFAULT_TIMEOUT_S:g} s by default with gloo):")
    for timeout in ("auto", "5"):
        found, back = stopped_worker(timeout)
        print(f"  --er-hang-timeout {timeout:<5} hang_detected {found:6.1f} s, training again {back:6.1f} s; "
              f"torchrun's default / this = {GLOO_DEFAULT_TIMEOUT_S / back:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
