"""The README's demo: train, get SIGKILLed mid-run, resume, and prove nothing was lost.

1. Train ``train_simple.py`` uninterrupted (the reference).
2. Train the same run again, SIGKILL it mid-training (a node dying), start it again: it resumes
   from the newest verified checkpoint, and every step's loss equals the reference, bit for bit.
3. Flip one byte in the newest checkpoint: ``verify`` names the file, and a resume falls back to
   the previous step instead of loading damaged weights.
Everything happens under ./demo-run on local disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.abspath(os.environ.get("DEMO_DIR", "demo-run"))
CLI = [sys.executable, "-m", "elastic_resume.cli"]
STEPS, SAVE_EVERY, KILL_AT = 300, 25, 140


def train(root: str, loss_log: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "train_simple.py"), "--root", root, "--steps", str(STEPS),
         "--save-every", str(SAVE_EVERY), "--loss-log", loss_log],
        start_new_session=True,
    )


def losses(path: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            out.setdefault(rec["step"], []).append(rec["loss"])
    return out


def last_step(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    ref_root, ref_log = os.path.join(OUT, "reference"), os.path.join(OUT, "reference-loss.jsonl")
    root, log = os.path.join(OUT, "ckpt"), os.path.join(OUT, "loss.jsonl")

    banner(f"1. reference run: {STEPS} steps, checkpoint every {SAVE_EVERY}")
    if train(ref_root, ref_log).wait() != 0:
        return 1

    banner(f"2. same run, SIGKILLed after step {KILL_AT}, then started again")
    proc = train(root, log)
    while last_step(log) < KILL_AT and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = subprocess.run([*CLI, "latest", root], check=True, capture_output=True, text=True).stdout.strip()
    print(f"killed at step {last_step(log)}; newest verified checkpoint: step {latest}", flush=True)
    if train(root, log).wait() != 0:
        return 1

    ref, got = losses(ref_log), losses(log)
    mismatched = [s for s in ref if any(v != ref[s][0] for v in got.get(s, [None]))]
    replayed = sum(len(v) - 1 for v in got.values())
    print(f"{len(ref)} steps compared, {replayed} re-run after the resume, {len(mismatched)} differ")
    if mismatched:
        print(f"FAIL: losses differ at steps {mismatched[:10]}")
        return 1
    print("every step's loss equals the uninterrupted run, bit for bit")

    banner("3. one flipped byte in the newest checkpoint")
    listing = json.loads(subprocess.run([*CLI, "ls", root, "--json"], check=True, capture_output=True, text=True).stdout)
    newest = listing[0]["step"]
    manifest = json.loads(subprocess.run([*CLI, "inspect", root, str(newest), "--json"], check=True,
                                         capture_output=True, text=True).stdout)
    victim = os.path.join(root, f"step-{newest:012d}", manifest["files"][0]["path"])
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    subprocess.run([*CLI, "verify", root])
    latest = subprocess.run([*CLI, "latest", root], check=True, capture_output=True, text=True).stdout.strip()
    print(f"a resume would now pick step {latest}")
    banner("elastic-resume ls --full")
    subprocess.run([*CLI, "ls", "--full", root], check=True)
    print(f"\ndemo OK: outputs under {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
