"""The README's main job, ``launch/demo.py``, as a user runs it from another directory: it
succeeds, every file it writes stays under its output directory, and ``report`` on that
directory reads only the event logs and says which run it shows."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness.processes import REPO, child_env


@pytest.mark.slow
def test_the_demo_keeps_its_files_and_its_report_reads_only_event_logs(tmp_path):
    out, cwd = tmp_path / "demo-run", tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([sys.executable, os.path.join(REPO, "launch", "demo.py")], cwd=cwd, capture_output=True,
                       text=True, env=child_env({"DEMO_DIR": str(out)}), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo OK" in r.stdout and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(cwd) == []  # no elastic-resume-logs/ beside the user: the reference run's log is in out
    report = subprocess.run([sys.executable, "-m", "elastic_resume.cli", "report", str(out)], capture_output=True,
                            text=True, env=child_env(), timeout=120)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr
    assert f"not an event log, skipped: {out / 'loss.jsonl'}" in report.stdout
    assert "these logs hold 2 runs" in report.stdout and "reporting the newest" in report.stdout
    assert "spike at step 45 -> back to step 40" in report.stdout
