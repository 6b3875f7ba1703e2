"""Losing the node that hosts the rendezvous.

With ``c10d`` (torchrun's default) the store lives in one node's agent: kill that node and every
other node's agent loses the store (pytorch#168242); each launcher ends within seconds with a
one-line ``launch_error``, and the job resumes from its newest verified step only when it is run
again (a scheduler's requeue). With ``etcd-v2`` the rendezvous lives in an etcd server that
outlives every training node: kill the node of rank 0 (which hosts the workers' own store) and
the other goes on at once, alone (``--nnodes 1:2``), from the newest verified step. Two launcher
agents on 127.0.0.1 stand for the two nodes; etcd is Debian's, started here."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from elastic_resume.events import read_events
from harness.etcd import missing_reason, start_etcd
from harness.processes import free_port
from tests.helpers.launcher import kill_node, launcher_cmd, node_log, start, stop, wait_for_listener

TRAIN = ("--steps", "60", "--save-every", "5", "--step-seconds", "0.1")


@pytest.fixture
def etcd(tmp_path):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    server = start_etcd(str(tmp_path / "etcd.log"))
    try:
        yield server
    finally:
        server.stop()


def test_etcd_honours_the_compare_and_swap_the_rendezvous_relies_on(etcd):
    """torch's etcd-v2 backend writes the rendezvous state only if it is unchanged since it read
    it (``prevIndex``) and creates it only if absent (``prevExist=false``)."""
    base = f"http://{etcd.endpoint}/v2/keys/er-cas"

    def put(value: str, **conditions: str) -> int:
        data = urllib.parse.urlencode({"value": value, **conditions}).encode()
        request = urllib.request.Request(f"{base}?{urllib.parse.urlencode(conditions)}", data=data, method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return int(json.load(r)["node"]["modifiedIndex"])
        except urllib.error.HTTPError as e:
            return -e.code
    first = put("a", prevExist="false")
    assert first > 0 and put("b", prevExist="false") == -412  # created once
    assert put("c", prevIndex=str(first + 1000)) == -412  # a stale read loses
    assert put("d", prevIndex=str(first)) > first  # the reader that saw it wins


def _launch(tmp_path, name: str, backend: str, endpoint: str, rdzv_id: str):
    cmd = launcher_cmd("--nnodes=1:2", "--nproc-per-node=1", f"--rdzv-backend={backend}",
                       f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
                       f"--er-event-log={tmp_path / f'events-{name}.jsonl'}",
                       args=("--root", str(tmp_path / "ckpt"), "--loss-log", str(tmp_path / "loss.jsonl"), *TRAIN))
    return start(cmd, str(tmp_path / f"node-{name}.log"))


def _wait_for_step(tmp_path, step: int, procs) -> None:
    loss_log = tmp_path / "loss.jsonl"
    deadline = time.monotonic() + 120
    while not (loss_log.exists() and f'"step": {step},' in loss_log.read_text()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), node_log(tmp_path, "a")
        time.sleep(0.05)


def _node_of_rank_0(tmp_path) -> str:
    for name in ("a", "b"):
        if any(e["event"] == "workers_started" and e["group_rank"] == 0
               for e in read_events(tmp_path / f"events-{name}.jsonl")):
            return name
    raise AssertionError("no node holds rank 0")


@pytest.mark.slow
def test_with_c10d_losing_the_stores_node_ends_every_node_within_seconds(tmp_path):
    port = free_port()
    procs = {"a": _launch(tmp_path, "a", "c10d", f"127.0.0.1:{port}", f"c10d-{port}")}
    wait_for_listener(port, procs["a"])  # node a's agent opens the store
    procs["b"] = _launch(tmp_path, "b", "c10d", f"127.0.0.1:{port}", f"c10d-{port}")
    try:
        _wait_for_step(tmp_path, 12, procs)
        kill_node(procs["a"])  # the store's host
        killed = time.time()
        assert procs["b"].wait(timeout=60) == 1, node_log(tmp_path, "b")
    finally:
        for p in procs.values():
            stop(p)
    events = read_events(tmp_path / "events-b.jsonl")
    error = [e for e in events if e["event"] == "launch_error"]
    assert error and "C10d store" in error[0]["error"] and error[0]["ts"] - killed < 30
    assert [e["event"] for e in events].count("workers_started") == 1  # nothing more ran


@pytest.mark.slow
def test_with_etcd_the_job_survives_losing_the_node_of_rank_0(tmp_path, etcd):
    procs = {}
    try:
        for name in ("a", "b"):
            procs[name] = _launch(tmp_path, name, "etcd-v2", etcd.endpoint, "etcd-survives")
        _wait_for_step(tmp_path, 12, procs)
        doomed = _node_of_rank_0(tmp_path)
        survivor = "b" if doomed == "a" else "a"
        kill_node(procs[doomed])  # rank 0's node: it hosts the workers' own store
        killed = time.time()
        assert procs[survivor].wait(timeout=180) == 0, node_log(tmp_path, survivor)
    finally:
        for p in procs.values():
            stop(p)
    events = read_events(tmp_path / f"events-{survivor}.jsonl")
    started = [e for e in events if e["event"] == "workers_started"]
    assert [e["world_size"] for e in started] == [2, 1]
    committed = {e["step"] for e in read_events(tmp_path / f"events-{survivor}.jsonl") + read_events(
        tmp_path / f"events-{doomed}.jsonl") if e["event"] == "save_committed"}
    restored = [e for e in events if e["event"] == "restored"]
    assert len(restored) == 1 and restored[0]["step"] in committed and restored[0]["step"] >= 10
    print(f"training again {started[1]['ts'] - killed:.1f} s after the node of rank 0 was killed")
    lines = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in lines if r["world"] == 1) == 60
