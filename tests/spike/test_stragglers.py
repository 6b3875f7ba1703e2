"""Stragglers: the busy-time clock and the persistence rule (pure), then real launches where one
rank sleeps before every forward: reported with its ratio (every rank's wall step time is the same
under DDP; the busy time is not), and, with exclusion on and a node to spare, its node leaves and
the other goes on alone from the step every rank saved."""

from __future__ import annotations

import time

import pytest
import torch

from elastic_resume.events import read_events
from elastic_resume.report import summarize
from elastic_resume.spike.guard import GuardOptions
from elastic_resume.spike.stragglers import BusyClock, StragglerWatch, pack, unpack
from tests.helpers.launcher import launcher_cmd, node_log, run, stop, two_nodes


def test_step_times_travel_with_their_rank_and_the_max_names_the_slowest():
    assert unpack(pack(0.1234, 7)) == (0.1234, 7)
    assert unpack(max(pack(0.5, 3), pack(0.2, 9), pack(0.5, 1))) == (0.5, 3)  # ties: the higher rank
    assert unpack(pack(-1.0, 0)) == (0.0, 0)


def test_a_straggler_is_reported_once_it_persists_and_again_only_after_it_caught_up():
    watch = StragglerWatch(factor=1.5, patience=3)
    slow = pack(0.3, 1)

    def check(step, packed=slow, total=0.3 + 0.1 * 3, world=4):
        return watch.observe(step, packed, total, world)
    assert check(10) is None and check(20) is None
    found = check(30)
    assert found is not None and (found.rank, found.ratio, found.busy_s, found.others_s) == (1, 3.0, 0.3, 0.1)
    assert check(40) is None  # one report per episode
    assert check(50, packed=pack(0.1, 2), total=0.4) is None  # caught up
    assert check(60) is None and check(70) is None and check(80) is not None
    assert check(90, packed=pack(0.3, 2)) is None  # another rank: its own count starts
    assert watch.observe(1, pack(9.0, 0), 9.0, 1) is None  # one rank: nobody to be slower than
    with pytest.raises(ValueError, match="straggler_factor"):
        StragglerWatch(factor=1.0, patience=1)
    with pytest.raises(ValueError, match="straggler_check_every"):
        GuardOptions(straggler_check_every=-1)


def test_busy_time_is_the_step_minus_the_wait_between_the_last_gradients_and_the_optimizer_step():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clock = BusyClock({"optimizer": optimizer}, {"model": model})
    model(torch.ones(2, 4)).sum().backward()
    time.sleep(0.2)  # what waiting for the other ranks' gradients looks like from here
    optimizer.step()
    assert 0.0 <= clock.busy(0.25) < 0.06
    assert clock.busy(0.25) == 0.25  # the next step starts from zero wait
    clock.close()
    model(torch.ones(2, 4)).sum().backward()
    time.sleep(0.05)
    optimizer.step()
    assert clock.busy(0.25) == 0.25  # hooks removed


STRAGGLER = ("--straggler-rank", "1", "--straggler-seconds", "0.15", "--straggler-check-every", "5",
             "--straggler-patience", "2")


@pytest.mark.slow
def test_a_rank_that_sleeps_before_every_forward_is_reported_with_its_ratio(tmp_path):
    cmd = launcher_cmd("--standalone", "--nproc-per-node=2", f"--er-event-log={tmp_path / 'events.jsonl'}",
                       args=("--root", str(tmp_path / "ckpt"), "--steps", "24", "--save-every", "8", "--guard",
                             *STRAGGLER))
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    events = read_events(str(tmp_path / "events.jsonl"))
    steps = [e["seconds"] for e in events if e["event"] == "step" and e.get("seconds")]
    assert min(steps[3:]) > 0.14  # every rank's step takes the straggler's time: wall time cannot tell
    found = [e for e in events if e["event"] == "straggler_detected"]
    assert len(found) == 1 and found[0]["straggler"] == 1 and found[0]["rank"] == 1 and found[0]["host"]
    assert found[0]["ratio"] >= 3 and found[0]["busy_s"] >= 0.14 and found[0]["checks"] == 2
    assert found[0]["step"] == 10  # the second check in a row (5, 10) that found it slow
    assert "straggler" in summarize(events).text() and "rank 1" in summarize(events).text()


@pytest.mark.slow
def test_with_exclusion_the_stragglers_node_leaves_and_the_other_goes_on_alone(tmp_path):
    procs = two_nodes(tmp_path, "1:2", ("--root", str(tmp_path / "ckpt"), "--steps", "30", "--save-every", "50",
                                        "--guard", "--exclude-stragglers", "--loss-log", str(tmp_path / "loss.jsonl"),
                                        *STRAGGLER), nproc=1)
    try:
        assert procs["b"].wait(timeout=240) == 0, node_log(tmp_path, "b")  # left on purpose: not a failure
        assert procs["a"].wait(timeout=240) == 0, node_log(tmp_path, "a")
    finally:
        for p in procs.values():
            stop(p)
    a, b = read_events(tmp_path / "events-a.jsonl"), read_events(tmp_path / "events-b.jsonl")
    found = [e for e in b if e["event"] == "straggler_detected"]
    assert len(found) == 1 and found[0]["straggler"] == 1
    assert [e["event"] for e in b if e["event"] in ("node_excluded", "restart")] == ["node_excluded"]
    saved = [e["step"] for e in a if e["event"] == "save_committed"]
    assert saved[0] == 11  # every rank saved the step the vote was read at, before node b left
    sizes = [e["world_size"] for e in a if e["event"] == "workers_started"]
    assert sizes == [2, 1]  # node a restarted without b
    assert [e["step"] for e in a if e["event"] == "restored" and e["rank"] == 0] == [11]
    finished = [e for e in b if e["event"] == "launch_finished"]
    assert "left the job" in finished[0]["reason"]
    lines = [line for line in (tmp_path / "loss.jsonl").read_text().splitlines() if '"step": 30,' in line]
    assert lines and all('"world": 1' in line for line in lines)
