"""The sbatch script: a golden file pinned to its generator, and a real Slurm on localhost: a
USR1 preemption saved, requeued and resumed bit for bit, a cancel, an admin's requeue, two jobs on
one node, a CPU-only cluster, a bad root."""

from __future__ import annotations

import os
import sys
import time

import pytest

from elastic_resume.errors import ConfigError
from elastic_resume.events import read_events
from elastic_resume.launcher.slurm import EXAMPLE, SbatchOptions, render_sbatch
from harness.processes import REPO, child_env
from harness.slurm import missing_reason, start_cluster
from tests.helpers.launcher import TRAIN, launcher_cmd, losses, restores, run, wait_event


def test_slurm_example_script_is_the_generators_output():
    with open(os.path.join(REPO, "slurm", "train.sbatch")) as f:
        assert f.read() == render_sbatch(EXAMPLE), \
            "slurm/train.sbatch is stale: regenerate it from elastic_resume.launcher.slurm.EXAMPLE"


def test_sbatch_generator_defaults_fit_the_cluster_and_refuse_a_lead_past_the_limit(tmp_path):
    import subprocess

    from elastic_resume.launcher.slurm import gpus_per_node_from_gres, slurm_seconds

    assert gpus_per_node_from_gres(["(null)", "(null)"]) is None  # a CPU cluster: ask for no GPUs
    assert gpus_per_node_from_gres(["gpu:8", "gpu:8(S:0-1)"]) == 8
    assert gpus_per_node_from_gres(["gpu:a100:4(S:0),gpu:a100:4(S:1)"]) == 8
    assert gpus_per_node_from_gres(["gpu:8", "gpu:4"]) is None  # nodes differ: the user says
    assert [slurm_seconds(t) for t in ("30", "30:15", "01:00:00", "1-00", "1-02:03", "1-02:03:04")] == [
        1800, 1815, 3600, 86400, 93780, 93784]
    with pytest.raises(ConfigError, match="--signal-lead 600 s is not shorter than --time 00:05:00"):
        render_sbatch(SbatchOptions(script="t.py", time="00:05:00", signal_lead_s=600))
    with pytest.raises(ConfigError, match="--time 'soon'"):
        render_sbatch(SbatchOptions(script="t.py", time="soon"))
    cli = [sys.executable, "-m", "elastic_resume.cli", "sbatch"]
    env = child_env({"PATH": "/usr/bin:/bin"})  # whatever sinfo says here; none is a CPU answer too
    r = subprocess.run([*cli, "t.py"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "--gpus-per-node" not in r.stdout and "--nproc-per-node=1 " in r.stdout
    assert "#SBATCH --output=%x-%j.out" in r.stdout
    r = subprocess.run([*cli, "--help"], capture_output=True, text=True, env=env)
    assert "(default: 24:00:00)" in r.stdout and "(default: 300)" in r.stdout
    r = subprocess.run([*cli, "-o", "job.sbatch", "t.py"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "--write job.sbatch" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*cli, "--time", "10", "--signal-lead", "900", "t.py"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--signal-lead 900" in r.stderr


def test_sbatch_generator_settings():
    text = render_sbatch(SbatchOptions(script="t.py", nodes=2, nproc_per_node=4, gpus_per_node=None,
                                       signal_lead_s=120, partition="gpu"))
    assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text and "--open-mode=append" in text
    assert "#SBATCH --partition=gpu" in text and "--gpus-per-node" not in text and "--no-kill" not in text
    assert "export ER_GRACE_SECONDS=96" in text and "--nnodes=2 " in text
    assert "trap forward USR1 TERM" in text
    for bad, flag in ((dict(nodes=0), "--nodes"), (dict(min_nodes=3), "--min-nodes"),
                      (dict(signal_lead_s=5), "--signal-lead"), (dict(grace_s=400), "--grace")):
        with pytest.raises(ConfigError, match=flag):
            render_sbatch(SbatchOptions(script="t.py", nodes=bad.pop("nodes", 2), **bad))


#: The credential lifetime, which is also how long a requeued job waits before it may start again
#: (Slurm's default, 120 s, is what users get; an admin can shorten it, and these tests do).
CRED_EXPIRE_S = 15


@pytest.fixture(scope="module")
def slurm():
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(cred_expire_s=CRED_EXPIRE_S)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["guard", "plain"])
def test_slurm_usr1_saves_requeues_and_the_job_resumes_bit_for_bit(slurm, tmp_path, loop):
    """USR1 as the time limit's warning sends it, at a step that is no multiple of --save-every:
    the run saves, the launcher requeues the job itself, Slurm starts it again after its requeue
    delay (nobody touches the job), and every loss equals an uninterrupted run's, bit for bit.
    The report counts the wait between the two runs. ``guard``: SpikeGuard carries the request in
    its vote; ``plain``: a CheckpointManager loop with save_if_preempted at the step boundary."""
    import subprocess

    events = str(tmp_path / "events.jsonl")
    train_args = ("--steps", "150", "--save-every", "100", "--step-seconds", "0.05", *(("--guard",) if loop == "guard" else ()))
    script = render_sbatch(SbatchOptions(
        script=TRAIN, script_args=("--root", str(tmp_path / "ckpt"), *train_args, "--loss-log", str(tmp_path / "loss.jsonl"),
                                   "--restore-report", str(tmp_path / "restored.jsonl")),
        job_name="er-test", nodes=1, nproc_per_node=2, gpus_per_node=None, time="00:15:00", signal_lead_s=60,
        output=str(tmp_path / "job.out"), launcher=f"{sys.executable} -m elastic_resume.cli",
        extra_env={"ER_EVENT_LOG": events},
    ))
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {**child_env(), **slurm.env}
    r = subprocess.run(["sbatch", "--parsable", f"--chdir={tmp_path}", str(path)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    try:
        loss_log, deadline = tmp_path / "loss.jsonl", time.monotonic() + 120  # a plain loop writes no step events
        while not (loss_log.exists() and '"step": 10,' in loss_log.read_text()):
            assert time.monotonic() < deadline, "no step 10 in the loss log"
            time.sleep(0.05)
        slurm.run("scancel", "--signal=USR1", "--batch", job)
        requeued = wait_event(events, lambda e: e["event"] in ("requeued", "requeue_failed"), timeout=120)
        assert requeued["event"] == "requeued", requeued
        info = slurm.wait_state(job, ("PENDING",), timeout=60)
        assert int(info["Restarts"]) == 1
        info = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
    except BaseException:
        slurm.run("scancel", job, check=False)
        raise
    out = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", (
        out[-3000:] + f"\n{info}\nslurmd: {slurm.log('slurmd')[-1500:]}\nslurmctld: {slurm.log('slurmctld')[-1500:]}")
    ev = read_events(events)
    saved = [e["step"] for e in ev if e["event"] == "preemption_save" and e["rank"] == 0]
    assert len(saved) == 1 and saved[0] >= 10 and saved[0] % 100 != 0
    finished = [e for e in ev if e["event"] == "launch_finished"]
    assert [e["exit_code"] for e in finished] == [75, 0]
    assert [e["scheduler_restarts"] for e in ev if e["event"] == "launch_started"] == [0, 1]
    assert [x["restored"] for x in restores(str(tmp_path / "restored.jsonl"))[-2:]] == [saved[0]] * 2
    assert "(restart 0)" in out and "(restart 1)" in out and "step ended with exit code 0: finished" in out
    # A preemption reads as one: no torch ERROR line or WARNING event for the workers' exit 75,
    # and the line after srun's "Exited with exit code 75" says what that was.
    assert "failed (exitcode: 75)" not in out and "workers_failed" not in out, out[-3000:]
    assert "step ended with exit code 75: preempted after a committed save, not an error" in out
    assert f"exit               75 (preempted by SIGUSR1 after a committed save; job {job} requeued)" in out
    assert [e["event"] for e in ev].count("workers_preempted") == 1
    # Every step trained once, every loss an uninterrupted run's (the example once stored a stale
    # step counter in the preemption save and trained 51..83 twice on top of the step-83 model).
    reference = tmp_path / "reference"
    reference.mkdir()
    r = run(launcher_cmd("--standalone", "--nproc-per-node=2", f"--er-event-log={reference / 'events.jsonl'}",
                         args=("--root", str(reference / "ckpt"), *train_args, "--loss-log", str(reference / "loss.jsonl"))))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(str(tmp_path / "loss.jsonl")) == losses(str(reference / "loss.jsonl"))
    # The queue time between the two runs is reported, and it is Slurm's requeue delay at least.
    r = subprocess.run([sys.executable, "-m", "elastic_resume.cli", "report", "--json", events], capture_output=True,
                       text=True, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    import json

    summary = json.loads(r.stdout)
    assert summary["sessions"] == 2 and len(summary["waits"]) == 1, summary["waits"]
    assert summary["waits"][0]["seconds"] >= CRED_EXPIRE_S and summary["waits"][0]["after"] == "preempted"
    assert summary["elapsed_s"] >= summary["wall_s"] + CRED_EXPIRE_S


def test_sbatch_command_reproduces_the_example(tmp_path):
    import subprocess

    out = tmp_path / "job.sbatch"
    e = EXAMPLE
    r = subprocess.run([sys.executable, "-m", "elastic_resume.cli", "sbatch", "--nodes", str(e.nodes), "--min-nodes",
                        str(e.min_nodes), "--nproc-per-node", str(e.nproc_per_node), "--gpus-per-node",
                        str(e.gpus_per_node), "--cpus-per-task", str(e.cpus_per_task), "--time", e.time,
                        "--signal-lead", str(e.signal_lead_s), "--setup", e.setup[0], "-o", e.output, "--write",
                        str(out), e.script, *e.script_args], capture_output=True, text=True, env=child_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == render_sbatch(EXAMPLE)
    assert (tmp_path / "logs").is_dir() and "created logs/" in r.stderr  # Slurm would not create it
    r = subprocess.run([sys.executable, "-m", "elastic_resume.cli", "sbatch", "--nodes", "2", "--min-nodes", "3", "t.py"],
                       capture_output=True, text=True, env=child_env())
    assert r.returncode == 2 and "--min-nodes" in r.stderr and "Traceback" not in r.stderr


def submit(slurm, tmp_path, *generator_args: str) -> tuple[str, str]:
    """Generate a script with the CLI in ``tmp_path`` (as a user does, nothing prepared), submit
    it from there; returns (job id, the script text)."""
    import subprocess

    env = {**child_env(), **slurm.env}
    gen = subprocess.run([sys.executable, "-m", "elastic_resume.cli", "sbatch", "--nodes", "1", "--time", "00:10:00",
                          "--signal-lead", "60", "--launcher", f"{sys.executable} -m elastic_resume.cli",
                          "--write", "job.sbatch", *generator_args], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60)
    assert gen.returncode == 0, gen.stderr
    r = subprocess.run(["sbatch", "--parsable", "job.sbatch"], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=60)
    assert r.returncode == 0, r.stderr  # no "Invalid generic resource (gres) specification" on a CPU cluster
    return r.stdout.strip().split(";")[0], (tmp_path / "job.sbatch").read_text()


@pytest.mark.slow
def test_a_generated_script_runs_on_a_cpu_cluster_and_a_bad_root_fails_once_with_78(slurm, tmp_path):
    """The generator's defaults on this CPU-only cluster, a log directory nobody prepared: the job
    runs and logs. Then a root that is a file: one clean line in the job log, exit 78, no retry."""
    good = tmp_path / "good"
    good.mkdir()
    job, text = submit(slurm, good, "-o", "logs/%x-%j.out", "--job-name", "er-cpu", TRAIN,
                       "--root", str(good / "ckpt"), "--steps", "6", "--save-every", "3")
    assert "--gpus-per-node" not in text and "--nproc-per-node=1 " in text
    try:
        info = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=240)
    except BaseException:
        slurm.run("scancel", job, check=False)
        raise
    log = good / "logs" / f"er-cpu-{job}.out"
    assert info["JobState"] == "COMPLETED", (log.read_text()[-3000:] if log.exists() else "no log") + f"\n{info}"
    assert "step ended with exit code 0" in log.read_text()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "snapshot.pt").write_bytes(b"not a directory")
    slurm.wait_node_idle()
    job, _ = submit(slurm, bad, "--job-name", "er-bad", TRAIN, "--root", str(bad / "snapshot.pt"), "--steps", "6")
    try:
        info = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=240)
    except BaseException:
        slurm.run("scancel", job, check=False)
        raise
    out = (bad / f"er-bad-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("78:"), out[-3000:] + f"\n{info}"
    assert out.count("BadRootError: checkpoint root") >= 1 and "Traceback" not in out, out[-3000:]
    assert "restarts           none" in out and "exit               78" in out
    assert int(info["Restarts"]) == 0


@pytest.mark.slow
def test_two_jobs_on_one_node_do_not_take_each_other_down(slurm, tmp_path):
    """Two generated jobs share the node; the short one ends while the long one trains. Each has
    its own rendezvous port (one fixed port put both on one store, and the survivor failed with
    'The connection to the C10d store has failed')."""
    jobs = {}
    for name, steps in (("long", "160"), ("short", "6")):
        work = tmp_path / name
        work.mkdir()
        jobs[name], _ = submit(slurm, work, "--job-name", f"er-{name}", TRAIN, "--root", str(work / "ckpt"),
                               "--steps", steps, "--save-every", "40", "--step-seconds", "0.05")
    try:
        infos = {name: slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
                 for name, job in sorted(jobs.items(), key=lambda kv: kv[0] != "short")}
    except BaseException:
        for job in jobs.values():
            slurm.run("scancel", job, check=False)
        raise
    logs = {name: (tmp_path / name / f"er-{name}-{job}.out").read_text() for name, job in jobs.items()}
    assert infos["short"]["JobState"] == "COMPLETED", logs["short"][-3000:]
    assert infos["long"]["JobState"] == "COMPLETED", logs["long"][-3000:]
    assert "restarts           none" in logs["long"] and "C10d store has failed" not in logs["long"]
    ports = {name: next(line for line in log.splitlines() if "(rendezvous " in line).rsplit(":", 1)[-1]
             for name, log in logs.items()}
    assert ports["long"] != ports["short"]


@pytest.mark.slow
def test_a_plain_scancel_ends_the_job_after_a_save_and_is_not_undone(slurm, tmp_path):
    """scancel sends TERM, which the workers also get for a preemption; the job is already
    COMPLETING in Slurm's eyes, so the launcher saves and does not requeue it."""
    events = str(tmp_path / "events.jsonl")
    job, _ = submit(slurm, tmp_path, "--job-name", "er-cancel", TRAIN, "--root", str(tmp_path / "ckpt"),
                    "--steps", "2000", "--save-every", "1000", "--guard", "--step-seconds", "0.05")
    try:
        slurm.wait_state(job, ("RUNNING",), timeout=120)
        log = tmp_path / f"er-cancel-{job}.out"
        deadline = time.monotonic() + 120
        while not (log.exists() and "events of this run go to" in log.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        events = log.read_text().split("events of this run go to ", 1)[1].split("\n", 1)[0].strip()
        wait_event(events, lambda e: e["event"] == "step" and e["step"] >= 5, timeout=120)  # training under way
        slurm.run("scancel", job)
        info = slurm.wait_state(job, ("CANCELLED", "COMPLETED", "FAILED", "PENDING"), timeout=120)
        time.sleep(3)
        info = slurm.job(job)
    except BaseException:
        slurm.run("scancel", job, check=False)
        raise
    out = log.read_text()
    assert info["JobState"] == "CANCELLED" and int(info["Restarts"]) == 0, out[-3000:] + f"\n{info}"
    ev = read_events(events)
    skipped = [e for e in ev if e["event"] == "requeue_skipped"]
    assert skipped and skipped[0]["job_state"] in ("COMPLETING", "CANCELLED") and not [e for e in ev if e["event"] == "requeued"]
    assert [e for e in ev if e["event"] == "preemption_save"]  # it saved first (KillWait left time)
    assert "the job was cancelled, so it is not requeued" in out


@pytest.mark.slow
def test_an_admins_requeue_is_not_reported_as_a_failed_requeue(slurm, tmp_path):
    """scontrol requeue also reaches the job as TERM; Slurm has already counted the restart, so
    the launcher saves and leaves the requeue to Slurm, with no false requeue_failed."""
    slurm.wait_node_idle()
    job, _ = submit(slurm, tmp_path, "--job-name", "er-admin", TRAIN, "--root", str(tmp_path / "ckpt"),
                    "--steps", "2000", "--save-every", "1000", "--guard", "--step-seconds", "0.05")
    log = tmp_path / f"er-admin-{job}.out"
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and "events of this run go to" in log.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        events = log.read_text().split("events of this run go to ", 1)[1].split("\n", 1)[0].strip()
        wait_event(events, lambda e: e["event"] == "step" and e["step"] >= 5, timeout=120)
        slurm.run("scontrol", "requeue", job)
        skipped = wait_event(events, lambda e: e["event"] in ("requeue_skipped", "requeued", "requeue_failed"),
                             timeout=120)
        info = slurm.wait_state(job, ("PENDING",), timeout=60)
    finally:
        slurm.run("scancel", job, check=False)
    assert skipped["event"] == "requeue_skipped" and "already requeued" in skipped["reason"], skipped
    assert int(info["Restarts"]) == 1
    assert [e for e in read_events(events) if e["event"] == "preemption_save"]
    assert f"after a committed save; Slurm has requeued job {job} itself)" in log.read_text()
