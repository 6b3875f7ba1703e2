"""Hangs the loss does not show: the workers' progress records and the launcher's watch, as pure
logic, then real launches: a worker stopped with SIGSTOP, a data loader that blocks forever, and
a save slower than the hang timeout (which is no hang)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from elastic_resume.events import read_events
from elastic_resume.heartbeat import Beat, Section, decode, encode, record_path
from elastic_resume.launcher.hangs import FLOOR_S, STARTUP_S, HangWatch
from elastic_resume.report import summarize
from harness.processes import children
from tests.helpers.launcher import launcher_cmd, losses, run, start, stop, wait_event


def test_records_round_trip_and_torn_ones_are_refused():
    beat = Beat(12, Section.SAVE, 100.5, 99.0)
    assert decode(encode(beat)) == beat and decode(encode(Beat(None, Section.STEP, 1.0, 1.0))).step is None
    assert decode(encode(beat)[:20]) is None and decode(b"\xff" * 32) is None


def _write(directory, local_rank, beat):
    with open(record_path(str(directory), local_rank), "wb") as f:
        f.write(encode(beat))


def test_the_watch_learns_the_step_time_waits_longer_in_a_save_and_names_the_suspect(tmp_path):
    watch = HangWatch(str(tmp_path))
    workers = {0: (0, os.getpid()), 1: (1, os.getpid())}
    assert watch.check(workers, now=0.0) == []  # nobody has beaten yet: nothing is watched
    _write(tmp_path, 0, Beat(1, Section.STEP, 10.0, 10.0))
    assert watch.check(workers, now=10.0 + STARTUP_S - 1) == []  # the start-up allowance
    for step in range(2, 6):  # 0.5 s per step
        _write(tmp_path, 0, Beat(step, Section.STEP, 10.0 + 0.5 * step, 10.0))
        watch.check(workers, now=10.0 + 0.5 * step)
    assert watch.limit(Section.STEP) == FLOOR_S and watch.limit(Section.SAVE) == 10 * FLOOR_S  # 20 x 0.5 s < floor
    _write(tmp_path, 1, Beat(4, Section.DATA, 12.0, 11.9))  # rank 1 stuck fetching step 5's batch
    hung = watch.check(workers, now=12.5 + FLOOR_S + 1)
    assert [h.rank for h in hung] == [1, 0]  # the lowest step first: rank 0 waits for it
    assert hung[0].section == Section.DATA and hung[0].seconds == pytest.approx(FLOOR_S + 1.5)
    _write(tmp_path, 0, Beat(5, Section.SAVE, 12.5, 12.5))  # in a save: ten times longer
    assert [h.rank for h in watch.check(workers, now=12.5 + FLOOR_S + 1)] == [1]
    _write(tmp_path, 1, Beat(5, Section.FINISHED, 12.0, 12.0))  # closed its manager: an evaluation may follow
    assert [h.rank for h in watch.check(workers, now=1e6)] == [0]
    fixed = HangWatch(str(tmp_path), timeout_s=2.0)
    assert fixed.limit(Section.STEP) == 2.0 and fixed.limit(Section.RESTORE) == 20.0
    assert fixed.limit(Section.STEP, started=False) == 20.0  # before the first step: warm-up, compilation
    watch.reset()
    assert not os.path.exists(record_path(str(tmp_path), 0)) and watch.check(workers, now=1e9) == []


def _cmd(tmp_path, *args: str, timeout: str = "3"):
    return launcher_cmd("--standalone", "--nproc-per-node=2", "--max-restarts=2", f"--er-hang-timeout={timeout}",
                        f"--er-event-log={tmp_path / 'events.jsonl'}",
                        args=("--root", str(tmp_path / "ckpt"), "--fault-dir", str(tmp_path), "--loss-log",
                              str(tmp_path / "loss.jsonl"), *args))


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None


@pytest.mark.slow
def test_a_stopped_worker_is_found_its_stack_kept_and_the_run_ends_exact(tmp_path):
    train = ("--steps", "60", "--save-every", "10", "--guard", "--step-seconds", "0.05")
    launcher = start(_cmd(tmp_path, *train), str(tmp_path / "launch.log"))
    events = str(tmp_path / "events.jsonl")
    try:
        wait_event(events, lambda e: e["event"] == "step" and e["step"] >= 23, proc=launcher)
        rank1 = next(p for p in children(launcher.pid) if _rank_of(p) == 1)
        stopped_at = time.monotonic()
        os.kill(rank1, signal.SIGSTOP)
        hang = wait_event(events, lambda e: e["event"] == "hang_detected", timeout=120, proc=launcher)
        detected_after = time.monotonic() - stopped_at
        assert launcher.wait(timeout=240) == 0, (tmp_path / "launch.log").read_text()[-3000:]
    finally:
        stop(launcher)
    assert hang["rank"] == 1 and hang["process_state"] == "stopped (SIGSTOP)" and hang["section"] == "step"
    assert 3 <= hang["seconds"] and detected_after < 3 + 30  # the timeout, not the 10-minute collective one
    assert hang["stacks_read"]["1"] == "py-spy" and "train_ddp.py" in open(os.path.join(hang["stacks"], "rank-1.txt")).read()
    ev = read_events(events)
    restarts = [e for e in ev if e["event"] == "restart"]
    assert restarts and restarts[0]["failures"][0]["hang"] == "step"
    assert "rank 1 hung in its step section" in summarize(ev).text() and "hangs              1" in summarize(ev).text()
    reference = tmp_path / "reference"
    reference.mkdir()
    r = run(_cmd(reference, *train))
    assert r.returncode == 0, r.stderr[-3000:]
    assert {k: v[-1] for k, v in losses(str(tmp_path / "loss.jsonl")).items()} == {
        k: v[-1] for k, v in losses(str(reference / "loss.jsonl")).items()}


@pytest.mark.slow
def test_a_data_loader_that_blocks_forever_is_named_with_its_stack(tmp_path):
    r = run(_cmd(tmp_path, "--steps", "30", "--save-every", "10", "--guard", "--hang-in-data-at-step", "15",
                 "--die-rank", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    ev = read_events(str(tmp_path / "events.jsonl"))
    hangs = [e for e in ev if e["event"] == "hang_detected"]
    assert len(hangs) == 1 and hangs[0]["rank"] == 1 and hangs[0]["section"] == "data" and hangs[0]["step"] == 14
    stack = open(os.path.join(hangs[0]["stacks"], "rank-1.txt")).read()
    assert "wait_for_a_batch_that_never_comes" in stack
    assert [e["step"] for e in ev if e["event"] == "restored" and e["rank"] == 0][-1] == 10
    assert "finished at step 30" in r.stdout


@pytest.mark.slow
def test_a_save_slower_than_the_hang_timeout_is_no_hang(tmp_path):
    r = run(_cmd(tmp_path, "--steps", "12", "--save-every", "6", "--ballast-mib", "600", "--ballast-rank", "1",
                 timeout="0.5"))
    assert r.returncode == 0, r.stderr[-3000:]
    ev = read_events(str(tmp_path / "events.jsonl"))
    slowest = max(e["seconds"] for e in ev if e["event"] == "save_committed")
    assert slowest > 0.5, f"the save took {slowest} s: too fast to show anything; raise --ballast-mib"
    assert not [e for e in ev if e["event"] == "hang_detected"]


def test_without_py_spy_a_blocked_workers_own_faulthandler_gives_its_stack(tmp_path, monkeypatch):
    """The worker wrapper registers faulthandler on SIGUSR2: a main thread blocked in C still
    answers. (A stopped process cannot: that needs py-spy, as the SIGSTOP test shows.)"""
    import subprocess
    import sys

    from elastic_resume.launcher import hangs
    from harness.processes import child_env

    beats = tmp_path / "beats"
    beats.mkdir()
    script = tmp_path / "blocked.py"
    script.write_text("import threading\n\ndef wait_for_a_lock_nobody_releases():\n    threading.Event().wait()\n\n"
                      "wait_for_a_lock_nobody_releases()\n")
    worker = subprocess.Popen([sys.executable, "-m", "elastic_resume.launcher.worker", str(script)],
                              env=child_env({"ER_HEARTBEAT_DIR": str(beats), "LOCAL_RANK": "0"}))
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(hangs.stack_path(str(beats), 0)):
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.05)
        time.sleep(1.0)  # into the wait
        monkeypatch.setattr(hangs, "py_spy", lambda: None)
        how = hangs.dump_stacks({0: (0, worker.pid)}, str(beats), str(tmp_path / "stacks"))
        assert how == {0: "faulthandler"}
        assert "wait_for_a_lock_nobody_releases" in (tmp_path / "stacks" / "rank-0.txt").read_text()
        assert worker.poll() is None  # asked, not killed
    finally:
        worker.kill()
        worker.wait()
