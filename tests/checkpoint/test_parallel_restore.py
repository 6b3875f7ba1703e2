"""A restore that scales with the job: each rank reads a disjoint share of the replicated files
and the ranks exchange the rest (real gloo process groups under torchrun). Every rank ends with
the bytes it would have read itself, a damaged file found by its one reader is still agreed by
every rank, and the S3 server's own request log shows O(N) reads, not N x N."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from elastic_resume.checkpoint.layout import step_dir
from elastic_resume.checkpoint.saving import assign_tensors
from harness.processes import REPO, child_env, stop_process
from harness.s3 import S3_ENV, make_bucket, requests_in_log, start_moto
from tests.helpers import tamper

JOB = os.path.join(REPO, "tests", "helpers", "parallel_restore_job.py")


def run(nproc: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", JOB, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=child_env({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}))


def restored(out, nproc: int) -> list[dict]:
    return [json.loads(open(f"{out}.{rank}").read()) for rank in range(nproc)]


@pytest.fixture
def logged_s3(tmp_path, monkeypatch):
    """A moto server of this test's own, its access log in a file: (url, options, env, log)."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    log = str(tmp_path / "moto-requests.log")
    proc, endpoint = start_moto(S3_ENV, request_log=log)
    try:
        bucket = make_bucket(endpoint)
        yield f"s3://{bucket}/run", {"endpoint_url": endpoint}, dict(S3_ENV, AWS_ENDPOINT_URL=endpoint), log
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_each_shared_file_is_read_once_per_restore_and_every_rank_gets_the_same_bytes(logged_s3, tmp_path):
    url, options, env, log = logged_s3
    common = ("--root", url, "--options", json.dumps(options))
    r = run(4, "save", *common, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    shared = [f["path"] for f in tamper.manifest_doc(tamper.raw(url, options), 2)["files"] if f["kind"] == "shared"]
    assert len(shared) == 4

    def gets() -> int:  # requests for the shared files' bytes (a HEAD and a GET per read)
        return sum(requests_in_log(log, method, f"/{step_dir(2)}/{path}") for path in shared for method in ("GET", "HEAD"))

    before = gets()
    r = run(4, "restore", *common, "--parallel", "0", "--out", str(tmp_path / "serial"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    serial = gets() - before
    r = run(4, "restore", *common, "--parallel", "1", "--out", str(tmp_path / "parallel"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    parallel = gets() - before - serial
    # Every rank read every shared file before; now each is read by one rank: N times fewer.
    assert serial == 4 * parallel and parallel >= len(shared), (serial, parallel)
    assert parallel <= 2 * len(shared)  # one read (a HEAD and a GET) per file per restore
    a, b = restored(tmp_path / "serial", 4), restored(tmp_path / "parallel", 4)
    assert a == b and len({json.dumps(x) for x in b}) == 1 and b[0]["step"] == 2 and b[0]["progress"] == {"step": 2}


@pytest.mark.slow
def test_a_parallel_restore_at_another_world_size_gets_the_same_bytes(local_root, tmp_path):
    r = run(4, "save", "--root", local_root.url)
    assert r.returncode == 0, r.stderr[-3000:]
    for nproc, parallel in ((2, "1"), (3, "1"), (2, "0")):
        out = tmp_path / f"out-{nproc}-{parallel}"
        r = run(nproc, "restore", "--root", local_root.url, "--parallel", parallel, "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        got = restored(out, nproc)
        assert len({json.dumps(x) for x in got}) == 1 and got[0]["step"] == 2
        if nproc == 2 and parallel == "0":
            assert got == restored(tmp_path / "out-2-1", 2)  # the same bytes as every rank reading


@pytest.mark.slow
@pytest.mark.parametrize("reader", [0, 1, 2])
def test_a_damaged_shared_file_found_by_its_one_reader_is_agreed_by_every_rank(local_root, tmp_path, reader):
    r = run(3, "save", "--root", local_root.url)
    assert r.returncode == 0, r.stderr[-3000:]
    st = tamper.raw(local_root.url)
    files = [f for f in tamper.manifest_doc(st, 2)["files"] if f["kind"] == "shared"]
    owner = assign_tensors([f["size"] for f in files], 3)  # who reads which file at a restore of 3 ranks
    damaged = files[owner.index(reader)]["path"]
    tamper.flip_byte(st, f"{step_dir(2)}/{damaged}", 200)
    log = tmp_path / "events.jsonl"
    r = run(3, "restore", "--root", local_root.url, "--out", str(tmp_path / "out"), env={"ER_EVENT_LOG": str(log)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert {x["step"] for x in restored(tmp_path / "out", 3)} == {1}  # every rank fell back to step 1
    events = [json.loads(line) for line in log.read_text().splitlines()]
    fallbacks = [e for e in events if e["event"] == "restore_fallback"]
    assert {e["rank"] for e in fallbacks} == {0, 1, 2}
    assert all(damaged.rsplit("/", 1)[-1] in e["file"] and "digest mismatch" in e["reason"] for e in fallbacks)
