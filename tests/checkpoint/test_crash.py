"""Crash consistency: a process saving checkpoints in a loop is SIGKILLed at random moments, many
times, on local disk and on S3. After every kill a separate process restores and must get a step
that is at least the last one the writer saw committed, with every byte equal to what was saved
for it: never an error, never torn data."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from harness.processes import REPO, child_env, stop_process

KILLS = {"local": 130, "s3": 80}  # 210 in total
# Seconds between a writer's first acknowledged commit and its SIGKILL. An S3 writer needs about
# a second to connect, so timing kills from the spawn would mostly hit the start-up.
DELAY = {"local": 0.25, "s3": 0.6}


class Driver:
    def __init__(self, mode: str, root, tmp_path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tests", "helpers", "crash_worker.py"), mode,
             "--root", root.url, "--options", json.dumps(root.storage_options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(root.env),
            cwd=tmp_path,
        )

    def ask(self, line: str) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, f"helper died answering {line!r}"
        return answer

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        stop_process(self.proc)


def last_acknowledged(progress: str) -> int:
    if not os.path.exists(progress):
        return 0
    with open(progress) as f:
        steps = [int(line) for line in f.read().split() if line.strip().isdigit()]
    return max(steps, default=0)


@pytest.mark.slow
def test_sigkill_during_saves_never_yields_torn_or_lost_checkpoints(root, tmp_path):
    rng = random.Random(20261122)
    writer = Driver("writer", root, tmp_path)
    verifier = Driver("verifier", root, tmp_path)
    restored_steps = []
    acked = 0
    try:
        for i in range(KILLS[root.kind]):
            progress = str(tmp_path / f"progress-{i}")
            pid = int(writer.ask(f"spawn {progress}").split()[1])
            if i % 5:  # most kills land among the saves ...
                deadline = time.monotonic() + 10
                while not os.path.exists(progress) and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0, DELAY[root.kind]))
            else:  # ... some during start-up and the very first save
                time.sleep(rng.uniform(0, 1.0))
            os.kill(pid, signal.SIGKILL)
            assert writer.ask(f"reap {pid}") == "reaped"
            acked = max(acked, last_acknowledged(progress))
            if i and i % 40 == 0:  # now and then, a verifier that has never run before
                verifier.close()
                verifier = Driver("verifier", root, tmp_path)
            answer = verifier.ask("check")
            if answer == "none":
                assert acked == 0, f"kill {i}: nothing restorable although step {acked} was committed"
                continue
            kind, step = answer.split(" ", 1)
            assert kind == "ok", f"kill {i}: {answer}"
            step = int(step)
            assert step >= acked, f"kill {i}: restored step {step} older than acknowledged commit {acked}"
            assert not restored_steps or step >= restored_steps[-1]
            restored_steps.append(step)
    finally:
        writer.close()
        verifier.close()
    # The kills must have landed across many saves, not all before the first commit.
    assert len(set(restored_steps)) >= KILLS[root.kind] // 8, restored_steps
