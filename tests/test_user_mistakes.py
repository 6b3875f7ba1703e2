"""A careless user's input, through the CLI as they would type it: every mistake is one line
naming the input (exit 2, or the line skipped), nothing is replaced that should not be, and the
report survives event lines of any shape (a property-based fuzz)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastic_resume import CheckpointManager
from elastic_resume.report import summarize
from harness.processes import child_env


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elastic_resume.cli", *args], capture_output=True, text=True,
                          env=child_env(env), timeout=120)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    return lines[-1] if lines else ""


@pytest.mark.parametrize("args, env, expected", [
    (["doctor", "--er-grace", "nan", "x.py"], None, "'nan' is not a number > 0"),
    (["doctor", "x.py"], {"ER_GRACE_SECONDS": "inf"}, "'inf' is not a number > 0 (from the flag or ER_GRACE_SECONDS)"),
    (["doctor", "--er-max-resumes-per-step", "-1", "x.py"], None, "'-1' is not an integer >= 0"),
    (["doctor", "x.py"], {"ER_HANG_TIMEOUT": "soon"}, "'soon' is not a number (from the flag or ER_HANG_TIMEOUT); or auto"),
    (["doctor", "--nnodes", "1:2:3", "x.py"], None, "--nnodes '1:2:3': expected a number of nodes N or a range MIN:MAX"),
    (["ls", "file://"], None, "a file:// URL needs an absolute path"),
])
def test_bad_flags_are_one_line_errors(args, env, expected):
    r = cli(*args, env=env)
    assert r.returncode == 2 and expected in one_line(r), r.stderr


def test_a_non_utf8_root_name_is_printed_escaped(tmp_path):
    empty = os.path.join(os.fsencode(tmp_path), b"empty-\xff")
    os.makedirs(empty)
    full = os.path.join(os.fsencode(tmp_path), b"run-\xff")
    CheckpointManager(os.fsdecode(full)).save(1, {"w": torch.ones(2)})
    # A strict UTF-8 stdout (as under many locales and CI runners): the name cannot be encoded as is.
    env = {"PYTHONIOENCODING": "utf-8:strict"}
    for command in ("ls", "verify", "latest"):
        for root in (empty, full):
            r = subprocess.run([sys.executable, "-m", "elastic_resume.cli", command, os.fsdecode(root)],
                               capture_output=True, env=child_env(env), timeout=120)
            assert r.returncode in (0, 1) and b"Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "elastic_resume.cli", "ls", os.fsdecode(empty)], capture_output=True,
                       env=child_env(env), timeout=120)
    assert b"empty-\\udcff" in r.stdout + r.stderr


def test_report_plot_writes_only_a_file_and_leaves_nothing_behind(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps({"ts": 100.0 + i, "event": "step", "step": i, "loss": 1.0 / (i + 1),
                                       "seconds": 0.1, "rank": 0}) + "\n" for i in range(1, 20)))
    (tmp_path / "dir").mkdir()
    r = cli("report", str(log), "--plot", str(tmp_path / "dir"))
    assert r.returncode == 2 and "not a file to write" in one_line(r)
    r = cli("report", str(log), "--plot", "/dev/null")
    assert r.returncode == 2 and "not a file to write" in one_line(r) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(os.listdir(tmp_path)) == ["dir", "events.jsonl"]  # no leftover temp file
    r = cli("report", str(log), "--plot", str(tmp_path / "loss.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["dir", "events.jsonl", "loss.png"]


def test_export_refuses_a_directory_and_writes_with_the_umask(tmp_path):
    pytest.importorskip("lightning")
    from elastic_resume.lightning import ElasticCheckpointIO

    bundle = tmp_path / "last.ckpt"
    ElasticCheckpointIO().save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, bundle)
    r = cli("export", str(bundle), str(tmp_path / "newdir") + "/")
    assert r.returncode == 2 and "is a directory" in one_line(r) and not (tmp_path / "newdir").exists()
    out = tmp_path / "model.ckpt"
    old = os.umask(0o022)
    try:
        r = cli("export", str(bundle), str(out))
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644


@contextlib.contextmanager
def read_only_mount(path) -> Iterator[None]:
    """A tmpfs at ``path``, writable inside the block until ``remount`` is called, then
    read-only (root could write through a chmod 555); unmounted at the end."""
    os.makedirs(path)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield lambda: subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_prune_dry_run_works_on_a_read_only_root(tmp_path):
    mnt = tmp_path / "ro"
    with read_only_mount(mnt) as make_read_only:
        root = mnt / "ckpt"
        mgr = CheckpointManager(root, keep_last=None)
        for s in (1, 2, 3):
            mgr.save(s, {"w": torch.ones(2)})
        mgr.close()
        make_read_only()
        r = cli("prune", str(root), "--keep", "1", "--dry-run")
        assert r.returncode == 0, r.stderr
        assert "would delete step 2" in r.stdout and "would delete step 1" in r.stdout, r.stdout
        r = cli("prune", str(root), "--keep", "1")  # the real prune says why it cannot, in one line
        assert r.returncode == 2 and "Read-only file system" in one_line(r)


def test_an_unreachable_endpoint_or_a_malformed_token_is_one_line(tmp_path):
    pytest.importorskip("gcsfs")
    from harness.processes import free_port

    r = cli("ls", "gs://bucket/run", "--storage-option", f"endpoint_url=http://127.0.0.1:{free_port()}",
            "--storage-option", "token=anon")
    assert r.returncode == 2 and "cannot reach gs endpoint" in one_line(r) and "(3 attempts)" in one_line(r)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # no client library's retry traceback
    connection = (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Zm9vYmFy;"
                  f"BlobEndpoint=http://127.0.0.1:{free_port()}/devstoreaccount1;")
    r = cli("ls", "az://container/run", "--storage-option", f"connection_string={connection}")
    assert r.returncode == 2 and "cannot reach az endpoint" in one_line(r), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Zm9vYmFy" not in r.stderr, r.stderr
    r = cli("ls", "gs://bucket/run", "--storage-option", f"token={tmp_path / 'no-such-credentials.json'}")
    assert r.returncode == 2 and "invalid GCS storage option" in one_line(r)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_resume_path_skips_a_dangling_ckpt_link(tmp_path):
    pytest.importorskip("lightning")
    from elastic_resume.lightning import ElasticCheckpointIO

    (tmp_path / "ckpt").mkdir()
    os.symlink(tmp_path / "gone.ckpt", tmp_path / "ckpt" / "last.ckpt")
    assert ElasticCheckpointIO().resume_path(tmp_path / "ckpt") is None


_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=False),
                         st.text(max_size=8))


def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3))


_json = st.recursive(_json_scalar, _containers, max_leaves=8)
_FIELDS = ["step", "rank", "loss", "seconds", "failures", "from_step", "to_step", "skipped",
           "through_step", "bytes", "attempt", "node", "pid", "signal", "exit_code", "reason"]
_EVENTS = ["step", "restart", "workers_failed", "restored", "restore_none", "rollback", "preemption_requested",
           "preemption_save", "save_committed", "launch_started", "launch_finished", "data_skipped", "corruption_found"]


_IN_CI = bool(os.environ.get("CI"))  # CI runs a fixed, reproducible set of examples


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=_IN_CI,
          database=None if _IN_CI else settings.default.database)
@given(st.lists(st.fixed_dictionaries({"event": st.sampled_from(_EVENTS), "ts": st.one_of(st.floats(0, 1e6), _json)},
                                      optional={k: _json for k in _FIELDS}), max_size=12))
def test_report_survives_typed_but_wrong_event_lines(events):
    import tempfile

    from elastic_resume.cli import main

    summary = summarize(events)  # never raises: wrong types are skipped and counted
    json.dumps(summary.as_dict(), allow_nan=True)
    summary.text()
    # And through the command, as a user runs it on such a file.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "events.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in events)
        assert main(["report", path, "--json"]) in (0, 2)
