"""Pure logic of the launcher: environment detection (Slurm, Kubernetes), the crash-loop
fallback plan, and the run report computed from known event sequences."""

from __future__ import annotations

import pytest

from elastic_resume.env import DEFAULT_RDZV_PORT, detect, expand_hostlist
from elastic_resume.errors import ConfigError
from elastic_resume.report import summarize
from elastic_resume.store import plan_resume


@pytest.mark.parametrize("text, hosts", [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[08-10,15]", ["gpu08", "gpu09", "gpu10", "gpu15"]),
    ("a[1-2],login5,b[7]", ["a1", "a2", "login5", "b7"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("n-[3-4].ib", ["n-3.ib", "n-4.ib"]),
])
def test_slurm_hostlists_expand(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["node[1-3", "node1-3]", "node[a-b]", "node[5-2]"])
def test_bad_hostlists_name_the_list(bad):
    with pytest.raises(ConfigError, match="host list"):
        expand_hostlist(bad)


def test_plain_environment_detects_nothing():
    d = detect({"HOME": "/root"})
    assert d.platform == "plain" and d.nnodes is None
    assert d.torchrun_defaults() == {"PET_MAX_RESTARTS": "3"}


SLURM_STEP = {"SLURM_JOB_ID": "981", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[07-09]",
              "SLURM_STEP_NUM_NODES": "3", "SLURM_NODEID": "2", "SLURM_RESTART_COUNT": "1",
              "SLURM_STEP_NUM_TASKS": "3"}


def test_slurm_step_gives_nodes_rank_id_endpoint_and_restarts():
    d = detect(SLURM_STEP)
    assert (d.platform, d.nnodes, d.node_rank, d.rdzv_id) == ("slurm", "3", 2, "slurm-981")
    assert d.rdzv_endpoint == f"gpu07:{DEFAULT_RDZV_PORT}" and d.restart_count == 1
    assert d.requeue_with_scontrol and not d.is_first_node and not d.notes
    pet = d.torchrun_defaults()
    assert pet["PET_NNODES"] == "3" and pet["PET_RDZV_BACKEND"] == "c10d" and "PET_NODE_RANK" not in pet


def test_slurm_min_nodes_port_and_task_count_note():
    d = detect({**SLURM_STEP, "ER_MIN_NODES": "2", "ER_RDZV_PORT": "31000", "SLURM_STEP_NUM_TASKS": "12"})
    assert d.nnodes == "2:3" and d.rdzv_endpoint == "gpu07:31000"
    assert "one launcher per node" in d.notes[0]


def test_slurm_batch_script_without_srun_uses_this_node_only():
    d = detect({"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_JOB_NUM_NODES": "4"})
    assert d.nnodes == "1" and d.rdzv_endpoint.startswith("localhost:") and "not inside srun" in d.notes[0]


def test_slurm_garbage_is_named():
    with pytest.raises(ConfigError, match="SLURM_NODEID"):
        detect({**SLURM_STEP, "SLURM_NODEID": "two"})


def test_indexed_job_uses_completion_index_and_headless_service_names():
    d = detect({"JOB_COMPLETION_INDEX": "1", "HOSTNAME": "trainer-1", "ER_K8S_SERVICE": "trainer", "ER_NNODES": "2"})
    assert (d.platform, d.nnodes, d.node_rank) == ("kubernetes-indexed-job", "2", 1)
    assert d.rdzv_endpoint == f"trainer-0.trainer:{DEFAULT_RDZV_PORT}" and d.rdzv_id == "k8s-trainer"
    with pytest.raises(ConfigError, match="ER_NNODES"):
        detect({"JOB_COMPLETION_INDEX": "0", "HOSTNAME": "trainer-0", "ER_K8S_SERVICE": "trainer"})
    with pytest.raises(ConfigError, match="ER_K8S_SERVICE"):
        detect({"JOB_COMPLETION_INDEX": "0", "HOSTNAME": "trainer-0", "ER_NNODES": "2"})


def test_jobset_pod_names_and_ranks():
    env = {"JOBSET_NAME": "llm", "REPLICATED_JOB_NAME": "workers", "JOB_INDEX": "1", "JOB_COMPLETION_INDEX": "1",
           "ER_PODS_PER_JOB": "2", "ER_NNODES": "4", "JOBSET_RESTART_ATTEMPT": "2"}
    d = detect(env)
    assert (d.platform, d.nnodes, d.node_rank, d.restart_count) == ("jobset", "4", 3, 2)
    assert d.rdzv_endpoint == f"llm-workers-0-0.llm:{DEFAULT_RDZV_PORT}"
    with pytest.raises(ConfigError, match="REPLICATED_JOB_NAME"):
        detect({"JOBSET_NAME": "llm"})


def test_pytorchjob_elastic_defers_to_pet_and_names_the_rendezvous():
    d = detect({"HOSTNAME": "bert-worker-1", "PET_RDZV_ENDPOINT": "bert-worker-0:23456", "PET_NNODES": "1:4",
                "PET_RDZV_BACKEND": "c10d"})
    assert d.platform == "pytorchjob" and d.rdzv_id == "pytorchjob-bert" and d.nnodes is None
    assert d.rdzv_backend is None  # the operator's PET_RDZV_BACKEND stands


def test_pytorchjob_without_elastic_policy_counts_pods():
    d = detect({"HOSTNAME": "bert-worker-0", "MASTER_ADDR": "bert-master-0", "MASTER_PORT": "23456",
                "WORLD_SIZE": "3", "RANK": "1"})
    assert (d.nnodes, d.node_rank) == ("3", 1) and d.rdzv_endpoint == f"bert-master-0:{DEFAULT_RDZV_PORT}"


def test_crash_loop_plan_drops_steps_resumed_too_often_but_never_the_oldest():
    assert plan_resume([30, 20, 10], {}, 3) == ([30, 20, 10], [])
    assert plan_resume([30, 20, 10], {30: 3}, 3) == ([20, 10], [30])
    assert plan_resume([30, 20, 10], {30: 5, 20: 3, 10: 9}, 3) == ([10], [30, 20])
    assert plan_resume([30, 20], {30: 7}, 0) == ([30, 20], [])  # disabled
    assert plan_resume([], {1: 4}, 3) == ([], [])


def test_crash_loop_fallback_through_the_manager(tmp_path):
    import torch

    from elastic_resume import CheckpointManager
    from elastic_resume.events import read_events

    log = tmp_path / "events.jsonl"
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=None, event_log=log, max_resumes_per_step=2)
    for s in (5, 10):
        mgr.save(s, {"w": torch.full((4,), float(s))})
    got = []
    for _ in range(4):
        state = {"w": torch.zeros(4)}
        got.append(CheckpointManager(tmp_path / "ckpt", event_log=log, max_resumes_per_step=2).restore(state))
    assert got == [10, 10, 5, 5]
    loops = [e for e in read_events(log) if e["event"] == "resume_crash_loop"]
    assert loops and loops[0]["step"] == 10 and loops[0]["resumes"] == 2
    mgr.save(15, {"w": torch.full((4,), 15.0)})  # progress: the new step is tried first again
    assert CheckpointManager(tmp_path / "ckpt", max_resumes_per_step=2).restore({"w": torch.zeros(4)}) == 15


def ev(ts, event, **kw):
    return {"ts": float(ts), "event": event, **kw}


def test_report_keeps_the_surviving_timeline_and_computes_goodput():
    events = [
        ev(0, "launch_started", node="n", pid=1),
        *[ev(1 + s, "step", rank=0, step=s, loss=1.0 / s, seconds=1.0) for s in range(1, 7)],  # steps 1-6
        ev(7.5, "workers_failed", node="n", pid=1, failures=[{"rank": 1, "exitcode": -9, "signal": "SIGKILL"}]),
        ev(8, "restart", node="n", pid=1, failures=[{"rank": 1, "exitcode": -9, "signal": "SIGKILL"}]),
        ev(8.1, "restart", node="m", pid=2, failures=None),  # the other node, same incident
        ev(10, "restored", rank=0, step=4),
        *[ev(10 + s - 4, "step", rank=0, step=s, loss=1.0 / s, seconds=1.0) for s in range(5, 9)],  # 5-8 again
        ev(14.5, "rollback", rank=0, from_step=8, to_step=6, skipped=[100, 140]),
        ev(14.6, "data_skipped", rank=0, through_step=9),
        *[ev(15 + s - 7, "step", rank=0, step=s, loss=0.1, seconds=1.0) for s in range(7, 11)],  # 7-10
        ev(18.5, "save_committed", rank=0, step=10, bytes=2**20, seconds=0.5),
        ev(18.6, "save_committed", rank=1, step=10, bytes=2**20, seconds=0.5),  # same commit, rank 1
        ev(20, "launch_finished", node="n", pid=1, exit_code=0, reason="finished"),
    ]
    s = summarize(events)
    assert s.wall_s == 20.0 and s.sessions == 1
    assert s.steps_final == 10 and s.steps_executed == 14 and s.last_step == 10
    assert s.useful_s == 10.0 and abs(s.goodput - 0.5) < 1e-9
    assert len(s.restarts) == 1 and s.restarts[0]["resumed_from"] == 4
    assert s.restarts[0]["cause"] == "rank 1 killed by SIGKILL" and s.restarts[0]["recover_s"] == 3.5
    assert s.rollbacks[0]["from_step"] == 8 and s.rollbacks[0]["to_step"] == 6
    assert s.saves == 1 and s.save_bytes == 2**20
    assert [seg[0][0] for seg in s.abandoned] == [5, 7]  # the thrown-away pieces of the curve
    text = s.text()
    assert "goodput            50.0%" in text and "spike at step 8 -> back to step 6" in text


def test_report_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from elastic_resume.report import plot

    events = [ev(s, "step", rank=0, step=s, loss=1.0 / s, seconds=0.5) for s in range(1, 20)]
    events.append(ev(9.5, "rollback", rank=0, from_step=9, to_step=5, skipped=None))
    out = tmp_path / "loss.png"
    plot(events, summarize(events), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_command_line(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import child_env

    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps(ev(s, "step", rank=0, step=s, loss=1.0, seconds=0.5)) + "\n" for s in range(1, 5)))
    cli = [sys.executable, "-m", "elastic_resume.cli", "report"]
    r = subprocess.run([*cli, str(tmp_path), "--json"], capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["steps_final"] == 4 and doc["useful_s"] == 2.0
    r = subprocess.run([*cli, str(tmp_path / "missing.jsonl")], capture_output=True, text=True, env=child_env())
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_settle_ddp_buckets_builds_a_zero_loss_from_any_output_and_names_what_it_cannot():
    import torch

    from elastic_resume.ddp import _zero_loss, settle_ddp_buckets

    a = torch.ones(2, requires_grad=True)
    out = {"logits": a * 3, "aux": (a * 2, "text")}
    loss = _zero_loss(out)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(a.grad, torch.zeros(2))
    with pytest.raises(TypeError, match="str"):
        _zero_loss("not a tensor")
    # Without DDP (a plain module) it is a harmless no-op that leaves no gradients and the mode.
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5))
    model.train()
    settle_ddp_buckets(model, torch.randn(4, 3))
    assert model.training and all(p.grad is None for p in model.parameters())
