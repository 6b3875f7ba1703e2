"""The installed ``elastic-resume`` console script, run as a real process, against local and S3
roots: output, JSON, exit codes, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from elastic_resume import CheckpointManager
from elastic_resume.cli import parse_storage_options
from elastic_resume.errors import ConfigError
from harness.processes import child_env
from tests.helpers import tamper
from tests.helpers.terminal import through_a_terminal

CLI = os.path.join(os.path.dirname(sys.executable), "elastic-resume")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=child_env(env), timeout=120)


@pytest.fixture
def populated(root):
    mgr = CheckpointManager(root.url, storage_options=root.storage_options, keep_last=None)
    for s in (100, 200, 300):
        mgr.save(s, {"w": torch.full((1000,), float(s)), "step": s}, metadata={"loss": s / 100})
    st = tamper.raw(root.url, root.storage_options)
    tamper.put(st, "step-000000000400/partial/rank-00000.ert", b"xx")  # a save that never committed
    return root


def test_ls_text_and_json(populated):
    r = run_cli("ls", populated.url, *populated.cli_options(), env=populated.env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["STEP", "STATUS", "SIZE", "WORLD", "AGE"]
    assert [line.split()[:2] for line in lines[1:-1]] == [
        ["400", "incomplete"], ["300", "committed"], ["200", "committed"], ["100", "committed"]]
    assert "no data was read" in lines[-1]  # "committed" is what the manifests say, not a verification
    r = run_cli("ls", populated.url, "--json", *populated.cli_options(), env=populated.env)
    rows = json.loads(r.stdout)
    assert rows[1]["step"] == 300 and rows[1]["world_size"] == 1 and rows[1]["size"] > 4000


def test_latest_verify_inspect(populated):
    opts = populated.cli_options()
    r = run_cli("latest", populated.url, *opts, env=populated.env)
    assert (r.returncode, r.stdout.strip()) == (0, "300")
    r = run_cli("verify", populated.url, *opts, env=populated.env)
    assert r.returncode == 0 and "step 300: OK" in r.stdout
    r = run_cli("inspect", populated.url, "200", "--json", *opts, env=populated.env)
    doc = json.loads(r.stdout)
    assert doc["step"] == 200 and doc["metadata"] == {"loss": 2.0} and doc["files"][0]["rank"] == 0
    r = run_cli("inspect", populated.url, "200", *opts, env=populated.env)
    assert "loss: 2.0" in r.stdout and "world size  1" in r.stdout


def test_verify_names_each_bad_file_and_latest_falls_back(populated):
    st = tamper.raw(populated.url, populated.storage_options)
    bad300 = tamper.data_files(st, 300)[0]
    tamper.flip_byte(st, bad300, 50)
    bad200 = tamper.data_files(st, 200)[0]
    tamper.truncate(st, bad200, 10)
    opts = populated.cli_options()
    r = run_cli("verify", populated.url, *opts, env=populated.env)
    assert r.returncode == 1
    assert "step 300: CORRUPT" in r.stdout and bad300.split("/")[-1] in r.stdout and "digest mismatch" in r.stdout
    assert "step 200: CORRUPT" in r.stdout and "size 10 bytes" in r.stdout
    assert "step 100: OK" in r.stdout
    r = run_cli("verify", populated.url, "--step", "300", "--json", *opts, env=populated.env)
    assert r.returncode == 1 and json.loads(r.stdout)[0]["problems"][0]["reason"].startswith("digest mismatch")
    r = run_cli("latest", populated.url, *opts, env=populated.env)
    assert (r.returncode, r.stdout.strip()) == (0, "100")
    # --quick only checks sizes: the flipped byte passes, the truncation does not.
    r = run_cli("latest", populated.url, "--quick", *opts, env=populated.env)
    assert r.stdout.strip() == "300"


def test_prune_dry_run_then_real(populated):
    opts = populated.cli_options()
    r = run_cli("prune", populated.url, "--keep", "1", "--dry-run", *opts, env=populated.env)
    assert r.returncode == 0 and "would delete step 200" in r.stdout and "would delete step 100" in r.stdout
    assert CheckpointManager(populated.url, storage_options=populated.storage_options).committed_steps() == [300, 200, 100]
    r = run_cli("prune", populated.url, "--keep", "1", *opts, env=populated.env)
    assert r.returncode == 0
    assert CheckpointManager(populated.url, storage_options=populated.storage_options).committed_steps() == [300]


def test_latest_on_empty_root_exits_1(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("latest", str(tmp_path / "empty"))
    assert r.returncode == 1 and "no verified checkpoint" in r.stderr


@pytest.mark.parametrize(
    "args, expect",
    [
        (["ls", "/definitely/not/here"], "checkpoint root /definitely/not/here does not exist"),
        (["prune", "ROOT", "--keep", "0"], "--keep must be at least 1"),
        (["prune", "ROOT", "--keep", "x"], "--keep expects an integer"),
        (["inspect", "ROOT", "-5"], ""),
        (["ls", "ROOT", "--storage-option", "secret:hunter2"], "--storage-option number 1 is not KEY=VALUE"),
        (["ls", "hdfs://namenode/x"], "unsupported scheme 'hdfs'"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(tmp_path, args, expect):
    args = [str(tmp_path) if a == "ROOT" else a for a in args]
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert expect in r.stderr
    assert "hunter2" not in r.stderr  # a mistyped secret is never echoed


def test_inspect_missing_step_exits_1(populated):
    r = run_cli("inspect", populated.url, "250", *populated.cli_options(), env=populated.env)
    assert r.returncode == 1 and "step 250 cannot be inspected" in r.stderr


def test_storage_option_parsing():
    opts = parse_storage_options(["endpoint_url=http://127.0.0.1:9", "anon=false", "max_concurrency=4",
                                  "client_kwargs.verify=false"])
    assert opts == {"endpoint_url": "http://127.0.0.1:9", "anon": False, "max_concurrency": 4,
                    "client_kwargs": {"verify": False}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_storage_options(["broken"])


def test_ls_and_inspect_say_what_they_have_not_read(populated):
    """A flipped byte: ls (manifests and sizes only) cannot see it and says so; ls --full and
    verify read the data and call the step corrupt; inspect does not claim more than it read."""
    opts = populated.cli_options()
    st = tamper.raw(populated.url, populated.storage_options)
    victim = tamper.data_files(st, 300)[0]
    tamper.flip_byte(st, victim, len(tamper.get(st, victim)) // 2)
    quick = run_cli("ls", populated.url, *opts, env=populated.env).stdout
    assert "no data was read; 'ls --full' or 'verify' checks every byte" in quick
    full = run_cli("ls", "--full", populated.url, *opts, env=populated.env).stdout
    assert any(line.split()[:2] == ["300", "corrupt"] for line in full.splitlines())
    shown = run_cli("inspect", populated.url, "300", *opts, env=populated.env)
    assert "(committed; data not read: 'verify --step 300' checks every byte)" in shown.stdout


def test_help_lists_every_kind_of_root():
    r = run_cli("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for scheme in ("file://", "s3://", "gs://", "az://", "memory://"):
        assert scheme in text


def _through_a_terminal(*args: str, env: dict[str, str] | None = None) -> str:
    """Run the CLI with stdout and stderr on a pseudo-terminal; everything it drew."""
    return through_a_terminal(CLI, *args, env=env)


def test_prune_and_export_draw_progress_bars_on_a_terminal_only(local_root, tmp_path):
    mgr = CheckpointManager(local_root.url, keep_last=None)
    for s in (1, 2, 3, 4):
        mgr.save(s, {"model": {"w": torch.full((1 << 16,), float(s))}, "step": s})
    drawn = _through_a_terminal("export", local_root.url, str(tmp_path / "w.safetensors"))
    assert "writing w.safetensors" in drawn and "%|" in drawn and "exported step 4" in drawn
    piped = run_cli("export", local_root.url, str(tmp_path / "w.pt"))
    assert piped.returncode == 0 and "writing" not in piped.stderr + piped.stdout
    drawn = _through_a_terminal("prune", local_root.url, "--keep", "2")
    assert "verifying the newest 2" in drawn and "deleting" in drawn and "deleted step 1" in drawn
    as_json = _through_a_terminal("prune", local_root.url, "--keep", "1", "--json")
    assert "verifying" not in as_json and json.loads(as_json[as_json.index("{"):])["deleted"] == [3]


def test_verify_draws_a_progress_bar_on_a_terminal_only_and_never_with_json(populated):
    args = (populated.url, *populated.cli_options())
    drawn = _through_a_terminal("verify", *args, env=populated.env)
    assert "verifying" in drawn and "%|" in drawn  # tqdm's bar
    assert "step 300: OK" in drawn
    as_json = _through_a_terminal("verify", *args, "--json", env=populated.env)
    assert "verifying" not in as_json and json.loads(as_json[as_json.index("["):])
    piped = run_cli("verify", *args, env=populated.env)
    assert piped.returncode == 0 and "verifying" not in piped.stderr + piped.stdout
