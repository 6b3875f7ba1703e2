"""Background saves at several ranks: the foreground waits on no other rank, and each rank
stages only what it writes (its slice of the replicated state and its own per-rank state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.processes import REPO, child_env


def run_ranks(nproc: int, tmp_path) -> list[dict]:
    flags = tmp_path / "flags"
    flags.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=0.5", os.path.join(REPO, "tests", "helpers", "async_foreground.py"),
           str(tmp_path / "ckpt"), str(flags)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=child_env({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}))
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0, (lines, r.stderr[-3000:])
    return sorted(lines, key=lambda line: line["rank"])


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_a_background_save_returns_before_other_ranks_start_theirs_and_stages_only_its_share(tmp_path, nproc):
    ranks = run_ranks(nproc, tmp_path)
    assert [r["rank"] for r in ranks] == list(range(nproc))
    total = ranks[0]["replicated_bytes"]
    for r in ranks:
        assert r["restored"] == 2 and r["exact"], r
        # What a rank holds for staging is what it writes (its shared slice; the file adds a
        # header, the staging its RNG streams: a few KiB either way), never the whole state.
        assert abs(r["staging_bytes"] - r["written_bytes"]) <= 64 << 10, r
        assert r["staging_bytes"] < total * 0.75, r
    # Together the ranks staged (and wrote) the replicated state once, not N times.
    assert sum(r["written_bytes"] for r in ranks) >= total
    assert sum(r["staging_bytes"] for r in ranks) < total + nproc * (64 << 10)
