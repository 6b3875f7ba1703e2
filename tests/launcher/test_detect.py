"""Pure platform detection: Slurm host lists and steps, Kubernetes Indexed Jobs, JobSets and PyTorchJobs."""

from __future__ import annotations

import pytest

from elastic_resume.contract import DEFAULT_RDZV_PORT
from elastic_resume.errors import ConfigError
from elastic_resume.launcher.detect import detect, expand_hostlist


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
    assert d.rdzv_endpoint == "gpu07:30981" and d.restart_count == 1  # a port of the job's own
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


def test_jobs_sharing_a_node_get_rendezvous_ports_of_their_own_that_the_batch_script_agrees_on():
    import subprocess

    from elastic_resume.launcher.slurm import SbatchOptions, render_sbatch

    ports = {detect({**SLURM_STEP, "SLURM_JOB_ID": job}).rdzv_endpoint for job in ("981", "982", "10981")}
    assert ports == {"gpu07:30981", "gpu07:30982"}  # 981 and 10981 share one only 10,000 ids apart
    assert detect({**SLURM_STEP, "ER_RDZV_PORT": "29400"}).rdzv_endpoint == "gpu07:29400"
    script = render_sbatch(SbatchOptions(script="t.py"))
    port_line = next(line for line in script.splitlines() if line.startswith("port="))
    shell = subprocess.run(["bash", "-c", f"SLURM_JOB_ID=982; {port_line}; echo $port"], capture_output=True, text=True)
    assert shell.stdout.strip() == "30982"  # the script's arithmetic is detect's
