"""A network partition that sends no RST: two launcher agents in two network namespaces (two
hosts, each with its own address), then every packet between them dropped by iptables inside both
namespaces. The workers block in a collective that never returns and never fails; the hang
timeout finds it in seconds (not the process group's 30 minutes), and the side that holds the
rendezvous (``--nnodes 1:2``) goes on alone from the newest verified checkpoint. The other side's
agent blocks on the store it cannot reach; its launcher sees its own loop stop and leaves (exit
1) within the hang timeout too."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from elastic_resume.events import read_events
from tests.helpers.k8s_pods import make_pod_network, netns_missing_reason
from tests.helpers.launcher import launcher_cmd, start, stop

HANG_TIMEOUT_S = 5


@pytest.fixture
def two_hosts():
    reason = netns_missing_reason() or (None if shutil.which("iptables") else
                                        "iptables is not installed (scripts/install-services.sh installs it)")
    if reason:
        pytest.skip(reason)
    net = make_pod_network({"node-a": ["node-a"], "node-b": ["node-b"]})
    try:
        yield net
    finally:
        net.teardown()  # the namespaces go, and their iptables rules with them


def drop_everything_between(net) -> None:
    """No RST, no ICMP: packets between the hosts vanish, both ways, in both namespaces."""
    a, b = net.address("node-a"), net.address("node-b")
    for host, other in (("node-a", b), ("node-b", a)):
        for rule in (["-A", "INPUT", "-s", other, "-j", "DROP"], ["-A", "OUTPUT", "-d", other, "-j", "DROP"]):
            subprocess.run([*net.prefix(host), "iptables", *rule], check=True)


def steps_seen(path) -> dict[int, int]:
    """rank -> the highest step it logged."""
    seen: dict[int, int] = {}
    try:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                seen[r["rank"]] = max(seen.get(r["rank"], 0), r["step"])
    except (OSError, ValueError):
        pass
    return seen


@pytest.mark.slow
def test_a_partition_is_found_within_the_hang_timeout_and_the_rendezvous_side_goes_on(two_hosts, tmp_path):
    net, port = two_hosts, 29611
    procs = {}
    try:
        for name in ("node-a", "node-b"):
            cmd = launcher_cmd("--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                               f"--rdzv-endpoint={net.address('node-a')}:{port}", "--rdzv-id=partition",
                               f"--er-hang-timeout={HANG_TIMEOUT_S}", f"--er-event-log={tmp_path / name}.jsonl",
                               args=("--root", str(tmp_path / "ckpt"), "--steps", "60", "--save-every", "5", "--guard",
                                     "--step-seconds", "0.1", "--loss-log", str(tmp_path / "loss.jsonl")))
            procs[name] = start([*net.prefix(name), *cmd], str(tmp_path / f"{name}.log"))
            time.sleep(1.0 if name == "node-a" else 0)  # node a hosts the rendezvous store
        deadline = time.monotonic() + 120
        while min(steps_seen(tmp_path / "loss.jsonl").values() or [0]) < 12 or len(steps_seen(tmp_path / "loss.jsonl")) < 2:
            assert time.monotonic() < deadline, (tmp_path / "node-a.log").read_text()[-3000:]
            assert all(p.poll() is None for p in procs.values())
            time.sleep(0.1)
        cut = time.time()
        drop_everything_between(net)
        assert procs["node-a"].wait(timeout=240) == 0, (tmp_path / "node-a.log").read_text()[-4000:]
        # Node b cannot reach the rendezvous store node a holds: its agent's loop blocks on it.
        # It leaves within the hang timeout too, instead of sitting until the store's timeouts.
        assert procs["node-b"].wait(timeout=120) == 1, (tmp_path / "node-b.log").read_text()[-4000:]
    finally:
        for p in procs.values():
            stop(p)
    events = read_events(tmp_path / "node-a.jsonl")
    hang = [e for e in events if e["event"] == "hang_detected"]
    assert hang, "the partition was never found"
    found_after = hang[0]["ts"] - cut
    assert found_after < HANG_TIMEOUT_S + 10  # the hang timeout (and a monitor interval), not 1800 s
    started = [e for e in events if e["event"] == "workers_started"]
    assert [e["world_size"] for e in started] == [2, 1]
    restored = [e for e in events if e["event"] == "restored"]
    committed = {e["step"] for e in events if e["event"] == "save_committed"}
    assert len(restored) == 1 and restored[0]["step"] in committed  # the newest verified step
    again = started[1]["ts"]
    print(f"partition at {cut:.1f}: found after {found_after:.1f} s, training again after {again - cut:.1f} s")
    lost = [e for e in read_events(tmp_path / "node-b.jsonl") if e["event"] == "rendezvous_lost"]
    assert len(lost) == 1 and lost[0]["ts"] - cut < HANG_TIMEOUT_S + 15
    assert "cut off" in (tmp_path / "node-b.log").read_text()
    lines = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in lines if r["world"] == 1) == 60
