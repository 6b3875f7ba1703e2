"""Running ``elastic-resume launch`` as real processes in tests: agents as "nodes", their worker
PIDs, waiting for events in their logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from elastic_resume.events import read_events
from harness.processes import REPO, alive, child_env, children, free_port

TRAIN = os.path.join(REPO, "launch", "train_ddp.py")
LAUNCH = [sys.executable, "-m", "elastic_resume.cli", "launch"]


def launcher_cmd(*flags: str, script: str = TRAIN, args: tuple[str, ...] = ()) -> list[str]:
    return [*LAUNCH, "--monitor-interval=0.2", *flags, script, *args]


def start(cmd: list[str], log_path: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a launcher in its own session, output to ``log_path``."""
    out = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=child_env(env),
                            start_new_session=True)


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(env), timeout=timeout)


def kill_node(agent: subprocess.Popen[str], timeout: float = 15) -> list[int]:
    """SIGKILL an agent and its workers, by PID: a node dying. Returns the workers' PIDs once
    they are gone (a SIGKILLed process takes a moment to exit and be reaped by init)."""
    workers = children(agent.pid)
    for pid in [agent.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait(timeout=30)
    wait_gone(workers, timeout, "after SIGKILL")
    return workers


def wait_gone(workers: list[int], timeout: float, after: str) -> None:
    """Wait until none of ``workers`` is alive; fail naming them ``timeout`` seconds ``after`` ..."""
    deadline = time.monotonic() + timeout
    while any(alive(w) for w in workers):
        if time.monotonic() > deadline:
            raise AssertionError(f"workers {workers} still alive {timeout}s {after}")
        time.sleep(0.02)


def kill_launcher_alone(launcher: subprocess.Popen[str], workers: list[int], timeout: float = 15) -> None:
    """SIGKILL only the launcher (no chance to clean up) and wait for ``workers`` to die with it:
    the orphan protection at work. Fails if any outlives it by ``timeout`` seconds."""
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    wait_gone(workers, timeout, "after their launcher was SIGKILLed (orphans)")


def wait_event(path: str, predicate, timeout: float = 120, proc: subprocess.Popen[str] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            for e in read_events(path):
                if predicate(e):
                    return e
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"launcher exited with {proc.returncode} before the event")
        time.sleep(0.05)
    raise AssertionError(f"no matching event in {path} within {timeout}s")


def stop(proc: subprocess.Popen[str]) -> None:
    """Tear down a launcher this test started, with its workers."""
    if proc.poll() is None:
        for pid in [proc.pid, *children(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)


def losses(path: str) -> dict[tuple[int, int], list[float]]:
    out: dict[tuple[int, int], list[float]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out.setdefault((r["rank"], r["step"]), []).append(r["loss"])
    return out


def restores(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def wait_for_listener(port: int, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"first agent exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("the first agent never opened the rendezvous port")


def two_nodes(tmp_path, nnodes: str, train_args: tuple[str, ...], nproc: int = 2):
    """Start two launcher agents on 127.0.0.1 (node a hosts the rendezvous store)."""
    port = free_port()
    procs = {}
    for name in ("a", "b"):
        cmd = launcher_cmd(f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
                           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test-{port}",
                           f"--er-event-log={tmp_path / f'events-{name}.jsonl'}", args=train_args)
        procs[name] = start(cmd, str(tmp_path / f"node-{name}.log"))
        if name == "a":
            wait_for_listener(port, procs["a"])
    return procs


def node_log(tmp_path, name: str) -> str:
    return (tmp_path / f"node-{name}.log").read_text()[-4000:]
