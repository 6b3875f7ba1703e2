"""``elastic-resume launch`` as real processes: two agents on 127.0.0.1 as two nodes, killed
workers and nodes, exit codes 75/76, preemption signals, a SIGKILLed launcher."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from elastic_resume import CheckpointManager
from elastic_resume.events import read_events
from harness.processes import REPO
from tests.helpers.launcher import (
    children,
    kill_launcher_alone,
    kill_node,
    launcher_cmd,
    losses,
    node_log,
    restores,
    run,
    start,
    stop,
    two_nodes,
    wait_event,
)


def standalone(tmp_path, *args: str, nproc: int = 2, flags: tuple[str, ...] = ()) -> list[str]:
    return launcher_cmd("--standalone", f"--nproc-per-node={nproc}", f"--er-event-log={tmp_path / 'events.jsonl'}",
                        *flags, args=("--root", str(tmp_path / "ckpt"), "--fault-dir", str(tmp_path), *args))


def start_guarded(tmp_path, steps: int, save_every: int):
    """A guarded 2-worker run with slow steps, started in the background: (cmd, events, proc)."""
    cmd = standalone(tmp_path, "--steps", str(steps), "--save-every", str(save_every), "--guard", "--step-seconds",
                     "0.05", "--restore-report", str(tmp_path / "restored.jsonl"), "--loss-log", str(tmp_path / "loss.jsonl"))
    return cmd, str(tmp_path / "events.jsonl"), start(cmd, str(tmp_path / "launch.log"))


@pytest.mark.slow
def test_two_nodes_survive_a_killed_worker_with_identical_losses(tmp_path):
    common = ("--steps", "24", "--save-every", "4")
    ref = tmp_path / "ref"
    ref.mkdir()
    r = run(standalone(ref, "--loss-log", str(ref / "loss.jsonl"), *common, nproc=4))
    assert r.returncode == 0, r.stderr[-3000:]
    procs = two_nodes(tmp_path, "2", ("--root", str(tmp_path / "ckpt"), "--loss-log", str(tmp_path / "loss.jsonl"),
                                      "--restore-report", str(tmp_path / "restored.jsonl"), "--die-at-steps", "10",
                                      "--die-rank", "3", "--fault-dir", str(tmp_path), *common))
    try:
        for name, p in procs.items():
            assert p.wait(timeout=240) == 0, node_log(tmp_path, name)
    finally:
        for p in procs.values():
            stop(p)
    got, want = losses(str(tmp_path / "loss.jsonl")), losses(str(ref / "loss.jsonl"))
    assert set(got) == set(want)
    for key, [loss] in want.items():
        assert all(v == loss for v in got[key]), f"rank/step {key}: {got[key]} != {loss}"
    assert sum(len(v) for v in got.values()) > len(want)  # steps 9-10 really were redone
    second = [r for r in restores(str(tmp_path / "restored.jsonl")) if r["restored"] is not None]
    assert len(second) == 4 and {r["restored"] for r in second} == {8}  # every rank, the same step
    events = read_events(tmp_path / "events-a.jsonl") + read_events(tmp_path / "events-b.jsonl")
    restarts = [e for e in events if e["event"] == "restart"]
    assert len(restarts) == 2  # one per node
    assert any(f.get("signal") == "SIGKILL" for e in restarts for f in e.get("failures") or [])


@pytest.mark.slow
def test_killed_node_survivor_goes_on_at_smaller_world_size(tmp_path):
    procs = two_nodes(tmp_path, "1:2", ("--root", str(tmp_path / "ckpt"), "--steps", "40", "--save-every", "4",
                                        "--step-seconds", "0.05", "--loss-log", str(tmp_path / "loss.jsonl"),
                                        "--restore-report", str(tmp_path / "restored.jsonl")))
    try:
        loss_log = tmp_path / "loss.jsonl"
        deadline = time.monotonic() + 120
        while not (loss_log.exists() and '"step": 10,' in loss_log.read_text()):
            assert time.monotonic() < deadline, node_log(tmp_path, "a")
            time.sleep(0.05)
        workers = kill_node(procs["b"])  # returns once they are gone
        assert workers
        assert procs["a"].wait(timeout=180) == 0, node_log(tmp_path, "a")
    finally:
        for p in procs.values():
            stop(p)
    reports = restores(str(tmp_path / "restored.jsonl"))
    last = reports[-2:]
    assert {r["rank"] for r in last} == {0, 1}
    assert len({r["restored"] for r in last}) == 1 and last[0]["restored"] >= 8
    lines = [line for line in loss_log.read_text().splitlines() if '"step": 40,' in line]
    assert lines and all('"world": 2' in line for line in lines)
    events = read_events(tmp_path / "events-a.jsonl")
    assert any(e["event"] == "restart" for e in events)
    sizes = [e["world_size"] for e in events if e["event"] == "workers_started"]
    assert sizes[0] == 4 and sizes[-1] == 2


def test_gave_up_exit_76_is_never_retried(tmp_path):
    # A spike before any checkpoint: nothing to roll back to, the workers give up (76).
    r = run(standalone(tmp_path, "--steps", "20", "--save-every", "10", "--guard", "--nan-at-step", "3",
                       flags=("--max-restarts=3",)))
    assert r.returncode == 76, r.stderr[-3000:]
    events = read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in events].count("workers_started") == 1
    assert "gave up" in r.stderr


def test_an_escaping_gave_up_error_exits_76_without_a_restart(tmp_path):
    """No try/except in the script: the worker entry point maps GaveUpError to 76, and the
    process group the script left is destroyed before teardown (which could abort otherwise)."""
    script = os.path.join(REPO, "tests", "helpers", "gives_up.py")
    r = run(launcher_cmd("--standalone", "--nproc-per-node=2", "--max-restarts=3",
                         f"--er-event-log={tmp_path / 'events.jsonl'}", script=script))
    assert r.returncode == 76, r.stdout[-3000:] + r.stderr[-3000:]
    events = read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in events].count("workers_started") == 1
    assert "elastic-resume: gave up: rank 1: loss spike with the rollback budget spent (test)" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.slow
def test_a_finished_job_is_never_trained_again(tmp_path):
    """The tutorial's shape (its own destroy_process_group at the end), eight launches: gloo's
    abort at process exit (1 in 6 runs here before) must never turn a finished run into a restart."""
    script = os.path.join(REPO, "tests", "helpers", "finishes.py")
    for i in range(8):
        log = tmp_path / f"events-{i}.jsonl"
        r = run(launcher_cmd("--standalone", "--nproc-per-node=2", "--max-restarts=3", f"--er-event-log={log}",
                             script=script))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert [e["event"] for e in read_events(log)].count("workers_started") == 1, f"launch {i} restarted"
        assert "terminate called" not in r.stdout + r.stderr


def test_the_worker_leaves_a_finished_script_before_teardown_with_its_exit_handlers_run(tmp_path):
    import subprocess
    import sys

    from harness.processes import child_env

    script = tmp_path / "job.py"
    script.write_text(
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(tmp_path / 'handler-ran')!r}, 'w').close())\n"
        "class AtTeardown:\n"
        f"    def __del__(self, open=open): open({str(tmp_path / 'teardown-ran')!r}, 'w').close()\n"
        "keep = AtTeardown()\n"
        "print('last words', end='')\n"  # unflushed: must still reach the pipe
        "if sys.argv[1:] == ['raise']: raise RuntimeError('boom')\n"
        "if sys.argv[1:]: sys.exit(int(sys.argv[1]))\n"
    )
    worker = [sys.executable, "-m", "elastic_resume.launcher.worker", str(script)]
    for args, code in (([], 0), (["75"], 75), (["3"], 3)):  # finished, or the status the script chose
        for name in ("handler-ran", "teardown-ran"):
            (tmp_path / name).unlink(missing_ok=True)
        r = subprocess.run([*worker, *args], capture_output=True, text=True, env=child_env(), timeout=60)
        assert r.returncode == code and r.stdout == "last words", r.stderr
        assert (tmp_path / "handler-ran").exists() and not (tmp_path / "teardown-ran").exists()
    # An uncaught exception takes the ordinary way out.
    r = subprocess.run([*worker, "raise"], capture_output=True, text=True, env=child_env(), timeout=60)
    assert r.returncode == 1 and "RuntimeError: boom" in r.stderr and (tmp_path / "teardown-ran").exists()


def test_sigusr1_twice_saves_once_exits_75_and_the_rerun_resumes(tmp_path):
    cmd, events, p = start_guarded(tmp_path, steps=60, save_every=50)
    try:
        wait_event(events, lambda e: e["event"] == "step" and e["step"] >= 5, proc=p)
        p.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        p.send_signal(signal.SIGUSR1)
        assert p.wait(timeout=120) == 75, (tmp_path / "launch.log").read_text()[-3000:]
    finally:
        stop(p)
    ev = read_events(events)
    names = [e["event"] for e in ev]
    assert names.count("preemption_requested") == 1 and names.count("preemption_signal_repeated") == 1
    saved = [e["step"] for e in ev if e["event"] == "preemption_save" and e["rank"] == 0]
    assert len(saved) == 1 and saved[0] >= 5
    assert CheckpointManager(str(tmp_path / "ckpt"), read_only=True).latest() == saved[0]
    log = (tmp_path / "launch.log").read_text()
    assert "preempted by SIGUSR1 after a committed save" in log
    assert "failed (exitcode: 75)" not in log and "workers_failed" not in log  # a preemption is no failure
    assert names.count("workers_preempted") == 1
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert restores(str(tmp_path / "restored.jsonl"))[-1]["restored"] == saved[0]
    # The preemption saved a step that is no multiple of --save-every: the rerun continues from
    # it, every step trained once, every loss equal to an uninterrupted run's, bit for bit.
    reference = tmp_path / "reference"
    reference.mkdir()
    r = run(standalone(reference, "--steps", "60", "--save-every", "50", "--guard", "--loss-log",
                       str(reference / "loss.jsonl")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert saved[0] % 50 != 0
    assert losses(str(tmp_path / "loss.jsonl")) == losses(str(reference / "loss.jsonl"))


def test_sigterm_to_the_whole_step_during_a_save(tmp_path):
    """As Slurm does at a time limit: SIGTERM to the launcher and to every worker while a large
    checkpoint is being written. The save finishes and commits, the preemption save follows, and
    every committed step verifies."""
    events = str(tmp_path / "events.jsonl")
    cmd = standalone(tmp_path, "--steps", "200", "--save-every", "8", "--guard", "--ballast-mib", "160",
                     "--ballast-rank", "0", "--step-seconds", "0.02")
    p = start(cmd, str(tmp_path / "launch.log"))
    try:
        started = wait_event(events, lambda e: e["event"] == "save_started" and e["step"] == 16 and e["rank"] == 0, proc=p)
        for pid in [p.pid, *children(p.pid)]:
            os.kill(pid, signal.SIGTERM)
        assert p.wait(timeout=120) == 75, (tmp_path / "launch.log").read_text()[-3000:]
    finally:
        stop(p)
    ev = read_events(events)
    committed = {e["step"] for e in ev if e["event"] == "save_committed" and e["rank"] == 0}
    saved = [e["step"] for e in ev if e["event"] == "preemption_save" and e["rank"] == 0]
    assert started["step"] in committed and saved and saved[0] > started["step"]
    mgr = CheckpointManager(str(tmp_path / "ckpt"), read_only=True)
    assert mgr.latest() == saved[0]
    assert all(mgr.store.verify(s, full=True).ok for s in mgr.committed_steps())


def test_sigkilled_launcher_takes_its_workers_along_and_a_relaunch_resumes(tmp_path):
    cmd, events, p = start_guarded(tmp_path, steps=40, save_every=4)
    try:
        wait_event(events, lambda e: e["event"] == "save_committed" and e["step"] >= 8, proc=p)
        workers = children(p.pid)
        assert len(workers) == 2
        kill_launcher_alone(p, workers)
    finally:
        stop(p)
    latest = CheckpointManager(str(tmp_path / "ckpt"), read_only=True).latest()
    assert latest is not None and latest >= 8
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {x["restored"] for x in restores(str(tmp_path / "restored.jsonl"))[-2:]} == {latest}


def test_user_mistakes_get_one_line_and_exit_2(tmp_path):
    r = run([*launcher_cmd(script=str(tmp_path / "nope.py"))])
    assert r.returncode == 2 and "training script" in r.stderr and "nope.py" in r.stderr
    assert "Traceback" not in r.stderr
    r = run([*launcher_cmd("--er-grace=0")])
    assert r.returncode == 2 and "--er-grace" in r.stderr
    r = run([*launcher_cmd()], env={"ER_GRACE_SECONDS": "soon"})
    assert r.returncode == 2 and "ER_GRACE_SECONDS" in r.stderr and "Traceback" not in r.stderr
    r = run([*launcher_cmd("--run-path")])
    assert r.returncode == 2 and "--run-path" in r.stderr


def test_doctor_shows_what_slurm_would_give(tmp_path):
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_RESTART_COUNT": "2", "ER_MIN_NODES": "1"}
    import sys

    r = run([sys.executable, "-m", "elastic_resume.cli", "doctor", "--nproc-per-node", "4"], env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "slurm (job 4242)" in out and "gpu07:34242 id slurm-4242" in out  # the job's own port
    assert "1:2 (elastic)" in out and re.search(r"scheduler restarts so far\s+2\n", out)
    assert re.search(r"node rank\s+1 from the scheduler", out)
    assert "elastic_resume.launcher.worker SCRIPT" in out
    # Script flags that abbreviate a launcher flag (--log ~ --log-dir) stay the script's.
    r = run([sys.executable, "-m", "elastic_resume.cli", "doctor", "train.py", "--log", "x", "--nnodes", "3"])
    assert r.returncode == 0, r.stderr
    assert "elastic_resume.launcher.worker train.py --log x --nnodes 3" in r.stdout
    assert "requeue with scontrol" not in out  # node 1 does not requeue; node 0 does


@pytest.mark.slow
def test_errors_no_restart_can_heal_exit_78_once_with_one_line(tmp_path):
    """A bad root, a state that does not fit the model, drift with drift="fail": each fails the
    same way on every restart, so the worker exits 78 with one line and the launcher, with
    restarts left, does not restart it."""
    snapshot = tmp_path / "snapshot.pt"
    snapshot.write_bytes(b"an old torch.save file")
    saved = tmp_path / "ckpt"
    first = run(launcher_cmd("--standalone", "--nproc-per-node=2", f"--er-event-log={tmp_path / 'first.jsonl'}", args=(
        "--root", str(saved), "--steps", "4", "--save-every", "4", "--fault-dir", str(tmp_path))))
    assert first.returncode == 0, first.stderr[-3000:]
    cases = {
        "checkpoint root .*snapshot.pt exists but is not a directory": ("--root", str(snapshot)),
        r"StateError: checkpoint step 4: cannot load state\['model'\]": ("--root", str(saved), "--hidden", "48"),
        "DriftError: the run resuming from step 4 differs": ("--root", str(saved), "--lr", "0.01", "--drift", "fail"),
    }
    for i, (expected, args) in enumerate(cases.items()):
        log = tmp_path / f"events-{i}.jsonl"
        r = run(launcher_cmd("--standalone", "--nproc-per-node=2", "--max-restarts=3", f"--er-event-log={log}",
                             args=(*args, "--steps", "8", "--fault-dir", str(tmp_path))))
        assert r.returncode == 78, r.stderr[-3000:]
        events = [e["event"] for e in read_events(str(log))]
        assert events.count("workers_started") == 1 and "restart" not in events, events
        assert re.search(expected, r.stderr) and "not retried" in r.stderr
        assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_no_python_workers_die_with_a_sigkilled_launcher_too(tmp_path):
    """--no-python runs another program as the worker; it keeps the orphan protection (the
    death signal survives the exec)."""
    script = tmp_path / "work.sh"
    script.write_text("#!/bin/sh\necho \"worker $RANK up\" >> \"$1\"\nexec sleep 300\n")
    script.chmod(0o755)
    up = tmp_path / "up.txt"
    p = start(launcher_cmd("--standalone", "--nproc-per-node=2", "--no-python", f"--er-event-log={tmp_path / 'e.jsonl'}",
                           script=str(script), args=(str(up),)), str(tmp_path / "launch.log"))
    try:
        deadline = time.monotonic() + 60
        while not (up.exists() and len(up.read_text().splitlines()) == 2):
            assert time.monotonic() < deadline and p.poll() is None, (tmp_path / "launch.log").read_text()[-2000:]
            time.sleep(0.05)
        workers = children(p.pid)
        assert len(workers) == 2 and all(open(f"/proc/{w}/comm").read().strip() == "sleep" for w in workers)
        kill_launcher_alone(p, workers)
    finally:
        stop(p)
    r = run(launcher_cmd("--standalone", "--nproc-per-node=1", "--no-python", "--max-restarts=2",
                         f"--er-event-log={tmp_path / 'missing.jsonl'}", script=str(tmp_path / "no-such-program")))
    assert r.returncode == 78 and "cannot run" in r.stderr and "no-such-program" in r.stderr
