"""What a preemption costs under Slurm: a real one-node Slurm on this machine (Debian's slurm-wlm
and munge, as root; ``harness/slurm.py``), the same DDP model and data on both sides
(``recovery_worker.py``), side by side in one run:

* **plain**: what users submit today: ``torchrun`` and a rank-0 ``torch.save`` every
  ``--save-every`` steps, ``#SBATCH --signal=B:USR1@lead`` and a batch-shell trap that runs
  ``scontrol requeue $SLURM_JOB_ID`` (the usual requeue recipe). The script does not save on the
  signal, so the steps since its last save are trained again.
* **elastic-resume**: the script ``elastic-resume sbatch`` generates; the loop calls
  ``save_if_preempted`` once per step, so the run saves the step it was at, and the launcher
  requeues the job.

Each side gets ``scancel --signal=USR1 --batch JOB`` (what the time limit's warning sends) after
``--signal-after`` steps, and runs to ``--steps``. Both first with Slurm's default requeue delay
(``cred_expire``, 120 s), then elastic-resume again with ``--short-cred-expire`` (the admin's knob).

Printed per side, in seconds from the signal: *restart*, until the second run's workers start
(the save and exit, then Slurm holds a requeued job until its old credential expires, then a
scheduler pass starts it, then srun and the imports); *first step*, its first step done; the steps
trained again; and the headline, *back*: until the run is at the step it was at. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from elastic_resume.events import read_events
from elastic_resume.launcher.slurm import SbatchOptions, render_sbatch
from harness.processes import child_env
from harness.slurm import SlurmCluster, missing_reason, start_cluster

WORKER = os.path.join(HERE, "recovery_worker.py")


def plain_script(work: str, args: argparse.Namespace) -> str:
    worker = [WORKER, "--mode", "plain", "--root", f"{work}/ckpt", "--timeline", f"{work}/timeline.jsonl",
              "--steps", str(args.steps), "--save-every", str(args.save_every), "--width", str(args.width),
              "--step-seconds", str(args.step_seconds)]
    return "\n".join([
        "#!/bin/bash",
        "#SBATCH --job-name=plain --nodes=1 --ntasks-per-node=1 --time=00:30:00",
        f"#SBATCH --requeue --open-mode=append --output={work}/job.out --signal=B:USR1@60",
        "trap 'scontrol requeue $SLURM_JOB_ID; exit 0' USR1",
        f"srun {sys.executable} -m torch.distributed.run --standalone --nproc-per-node=2 {' '.join(worker)} &",
        "wait",
        "",
    ])


def er_script(work: str, args: argparse.Namespace) -> str:
    return render_sbatch(SbatchOptions(
        script=WORKER, script_args=("--mode", "er", "--root", f"{work}/ckpt", "--timeline", f"{work}/timeline.jsonl",
                                    "--steps", str(args.steps), "--save-every", str(args.save_every),
                                    "--width", str(args.width), "--step-seconds", str(args.step_seconds)),
        job_name="er", nodes=1, nproc_per_node=2, time="00:30:00", signal_lead_s=60, output=f"{work}/job.out",
        launcher=f"{sys.executable} -m elastic_resume.cli", extra_env={"ER_EVENT_LOG": f"{work}/events.jsonl"}))


def timeline(path: str) -> list[dict]:
    """The JSONL lines written so far (a line being written is skipped)."""
    return read_events(path) if os.path.exists(path) else []


def one(cluster: SlurmCluster, name: str, script: str, work: str, args: argparse.Namespace) -> dict:
    path = os.path.join(work, "job.sbatch")
    with open(path, "w") as f:
        f.write(script)
    env = {**child_env(), **cluster.env}
    r = subprocess.run(["sbatch", "--parsable", f"--chdir={work}", path], capture_output=True, text=True, env=env,
                       timeout=60)
    if r.returncode != 0:
        raise SystemExit(f"{name}: sbatch failed: {r.stderr.strip()}")
    job = r.stdout.strip().split(";")[0]
    tl = os.path.join(work, "timeline.jsonl")
    try:
        deadline = time.monotonic() + 300
        while not any(e["event"] == "step" and e["step"] >= args.signal_after for e in timeline(tl)):
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: no step {args.signal_after} after 300 s; see {work}/job.out")
            time.sleep(0.05)
        signalled = time.time()
        cluster.run("scancel", "--signal=USR1", "--batch", job)
        info = cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=900)
    except BaseException:
        cluster.run("scancel", job, check=False)
        raise
    if info["JobState"] != "COMPLETED":
        raise SystemExit(f"{name}: job ended {info['JobState']}; see {work}/job.out")
    lines = timeline(tl)
    steps = [e for e in lines if e["event"] == "step"]
    before = [e for e in steps if e["ts"] <= signalled]
    at = before[-1]["step"] if before else 0
    restarted = min(e["at"] for e in lines if e["event"] == "process_start" and e["at"] > signalled)
    resumed = next(e["step"] for e in lines if e["event"] == "restored" and e["ts"] > restarted)
    first = next(e for e in steps if e["ts"] > restarted)
    back = next(e for e in steps if e["ts"] > restarted and e["step"] >= at)
    return {"side": name, "signal_at_step": at, "resumed_from": resumed, "steps_again": max(0, at - resumed),
            "restart_s": restarted - signalled, "first_step_s": first["ts"] - signalled,
            "back_s": back["ts"] - signalled, "restarts": int(info["Restarts"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--save-every", type=int, default=80, help="the periodic save interval (both sides)")
    p.add_argument("--signal-after", type=int, default=150, help="send USR1 once this step is done")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--step-seconds", type=float, default=0.25,
                   help="each step sleeps this long too: a model whose steps cost something to redo")
    p.add_argument("--short-cred-expire", type=int, default=15)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    reason = missing_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    results = []
    for cred_expire, sides in ((None, ("plain", "elastic-resume")), (args.short_cred_expire, ("elastic-resume",))):
        cluster = start_cluster(cred_expire_s=cred_expire)
        try:
            for side in sides:
                work = tempfile.mkdtemp(prefix=f"bench-slurm-{side}-")
                try:
                    cluster.wait_node_idle()
                    script = plain_script(work, args) if side == "plain" else er_script(work, args)
                    row = one(cluster, side, script, work, args)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                row["cred_expire_s"] = cred_expire or 120
                results.append(row)
                print(json.dumps(row), flush=True)
        finally:
            cluster.stop()
    print(f"\nA preemption under Slurm (USR1 after step {args.signal_after}, periodic saves every {args.save_every} "
          "steps; seconds from the signal):")
    print(f"{'side':<16} {'cred_expire':>11} {'restart':>8} {'first step':>10} {'redone':>7} {'back':>8}")
    for r in results:
        print(f"{r['side']:<16} {r['cred_expire_s']:>9} s {r['restart_s']:>8.1f} {r['first_step_s']:>10.1f} "
              f"{r['steps_again']:>7} {r['back_s']:>8.1f}")
    plain = next(r for r in results if r["side"] == "plain")
    er = next(r for r in results if r["side"] == "elastic-resume")
    short = results[-1]
    print(f"\nback where it was: plain / elastic-resume = {plain['back_s'] / er['back_s']:.2f}x with Slurm's default "
          f"delay; elastic-resume with cred_expire={short['cred_expire_s']} s: {er['back_s'] / short['back_s']:.2f}x "
          "faster again. The queue wait is Slurm's (cred_expire + one scheduler pass): no job can shorten it "
          "from inside, because Slurm sets the requeued job's BeginTime when its last process is gone.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
