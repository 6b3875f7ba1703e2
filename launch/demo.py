"""The README's demo (``make demo``): a two-process DDP run under ``elastic-resume launch`` that
survives a killed worker and a loss spike, then shows what verification and the report see.

1. Reference: the run uninterrupted.
2. The same run with faults: worker rank 1 is SIGKILLed at step 23 (the launcher restarts the
   workers, which resume from the newest verified checkpoint, step 20), and rank 1's loss spikes
   at step 45 (both ranks agree through the vote, roll back in-process to step 40, skip the
   bad data and go on). Every step before the spike matches the reference bit for bit, the
   steps redone after the kill included.
3. One flipped byte in the newest checkpoint: ``verify`` names the file, a resume would fall
   back to the step before.
4. ``elastic-resume report``: restarts, rollbacks, goodput, and a PNG of the loss curve.

Everything is written under ./demo-run on local disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.abspath(os.environ.get("DEMO_DIR", "demo-run"))
CLI = [sys.executable, "-m", "elastic_resume.cli"]
STEPS, SAVE_EVERY, KILL_AT, SPIKE_AT = 60, 5, 23, 45


def launch(root: str, loss_log: str, events: str, *faults: str, summary: bool = True) -> int:
    # Every file of the demo, event logs included, stays under OUT (nothing in the checkout).
    cmd = [*CLI, "launch", "--standalone", "--nproc-per-node=2", "--monitor-interval=0.2", f"--er-event-log={events}"]
    if not summary:
        cmd.append("--er-no-summary")
    cmd += [os.path.join(HERE, "train_ddp.py"), "--root", root, "--steps", str(STEPS), "--save-every", str(SAVE_EVERY),
            "--guard", "--loss-log", loss_log, "--fault-dir", OUT, *faults]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # torchrun's own log lines (worker failures it handles) go to the file; our summary stays.
    with open(os.path.join(OUT, "launcher.log"), "a") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.PIPE, text=True)
        summary = proc.stderr.split("elastic-resume run summary")
        log.write(summary[0])
    if len(summary) > 1:
        print("elastic-resume run summary" + summary[1], end="", flush=True)
    return proc.returncode


def losses(path: str) -> dict[tuple[int, int], list[float]]:
    """Per (rank, step), the losses logged before any rollback (steps redone after a rollback
    train on other data, by design)."""
    out: dict[tuple[int, int], list[float]] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["rollbacks"] == 0:
                out.setdefault((rec["rank"], rec["step"]), []).append(rec["loss"])
    return out


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def cli(*args: str, check: bool = True) -> str:
    return subprocess.run([*CLI, *args], check=check, capture_output=True, text=True).stdout


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    ref_root, ref_log = os.path.join(OUT, "reference"), os.path.join(OUT, "reference-loss.jsonl")
    root, log, events = os.path.join(OUT, "ckpt"), os.path.join(OUT, "loss.jsonl"), os.path.join(OUT, "events.jsonl")

    banner(f"1. reference: 2 processes, {STEPS} steps, checkpoint every {SAVE_EVERY}")
    if launch(ref_root, ref_log, os.path.join(OUT, "reference-events.jsonl"), summary=False) != 0:
        print(f"FAIL: the reference run failed; see {OUT}/launcher.log")
        return 1

    banner(f"2. the same run; worker rank 1 is SIGKILLed at step {KILL_AT}, its loss spikes at step {SPIKE_AT}")
    rc = launch(root, log, events, "--die-at-steps", str(KILL_AT), "--die-rank", "1", "--spike-at-step", str(SPIKE_AT),
                "--spike-rank", "1")
    if rc != 0:
        print(f"FAIL: exit code {rc}; see {OUT}/launcher.log")
        return 1
    ref, got = losses(ref_log), losses(log)
    before_spike = [k for k in ref if k[1] < SPIKE_AT]
    differ = [k for k in before_spike if any(v != ref[k][0] for v in got.get(k, [None]))]
    redone = sum(len(got[k]) - 1 for k in before_spike if k in got)
    print(f"steps before the spike: {len(before_spike) // 2} per rank, {redone // 2} redone after the kill, "
          f"{len(differ)} differ from the reference")
    if differ or not redone:
        print(f"FAIL: losses differ at (rank, step) {differ[:10]}")
        return 1
    print("every loss before the spike equals the uninterrupted run, bit for bit")

    banner("3. one flipped byte in the newest checkpoint")
    newest = json.loads(cli("ls", root, "--json"))[0]["step"]
    manifest = json.loads(cli("inspect", root, str(newest), "--json"))
    victim = os.path.join(root, f"step-{newest:012d}", manifest["files"][0]["path"])
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    print(cli("verify", root, check=False), end="")
    print(f"a resume would now pick step {cli('latest', root).strip()} instead of {newest}")

    banner("4. elastic-resume report")
    plot = os.path.join(OUT, "loss.png")
    print(cli("report", events, "--plot", plot), end="")
    print(f"\ndemo OK: outputs under {OUT} (open {plot})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
