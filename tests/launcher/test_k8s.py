"""The Kubernetes manifests under k8s/: strict offline validation (kubernetes-validate for core
kinds; structural checks plus strict validation of the embedded Job/Pod templates for JobSet and
PyTorchJob), the exit-code policy, what each pod's environment makes the launcher do, and the
Indexed Job's two pods run as local processes in network namespaces of their own."""

from __future__ import annotations

import os
import sys
import time

import jsonschema
import kubernetes_validate
import pytest

from elastic_resume.contract import DEFAULT_RDZV_PORT, Env, ExitCode
from elastic_resume.events import read_events
from elastic_resume.launcher.detect import detect
from harness.processes import REPO, child_env
from tests.helpers.k8s_pods import (
    JOBSET_SCHEMA,
    PYTORCHJOB_SCHEMA,
    load,
    make_pod_network,
    netns_missing_reason,
    pod_env,
)
from tests.helpers.launcher import restores, start, stop

K8S_VERSION = "1.33.0"


def strict(doc):
    return kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_indexed_job_and_service_validate_strictly():
    docs = load("indexed-job.yaml")
    assert [d["kind"] for d in docs] == ["Service", "Job"]
    for doc in docs:
        strict(doc)


def test_jobset_is_structurally_valid_and_its_job_template_validates_strictly():
    [doc] = load("jobset.yaml")
    jsonschema.validate(doc, JOBSET_SCHEMA)
    for rjob in doc["spec"]["replicatedJobs"]:
        strict({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{doc['metadata']['name']}-{rjob['name']}"},
                "spec": rjob["template"]["spec"]})


def test_pytorchjob_is_structurally_valid_and_its_pod_template_validates_strictly():
    [doc] = load("pytorchjob.yaml")
    jsonschema.validate(doc, PYTORCHJOB_SCHEMA)
    for role, spec in doc["spec"]["pytorchReplicaSpecs"].items():
        strict({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()}, "template": spec["template"]})
        assert spec["template"]["spec"]["containers"][0]["name"] == "pytorch"  # the operator requires it


def test_structural_check_catches_mistakes():
    [doc] = load("jobset.yaml")
    doc["spec"]["replicatedJob"] = doc["spec"].pop("replicatedJobs")  # a typo
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, JOBSET_SCHEMA)
    [doc] = load("pytorchjob.yaml")
    doc["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, PYTORCHJOB_SCHEMA)
    [_, job] = load("indexed-job.yaml")
    job["spec"]["template"]["spec"]["containers"][0]["commandd"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        strict(job)


def job_specs():
    yield "indexed-job.yaml", load("indexed-job.yaml")[1]["spec"]
    yield "jobset.yaml", load("jobset.yaml")[0]["spec"]["replicatedJobs"][0]["template"]["spec"]


@pytest.mark.parametrize("name, spec", list(job_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_exit_code_policy_and_grace_period(name, spec):
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    rules = spec["podFailurePolicy"]["rules"]
    by_code = {code: r["action"] for r in rules if "onExitCodes" in r for code in r["onExitCodes"]["values"]}
    assert by_code == {ExitCode.GAVE_UP: "FailJob", ExitCode.PERMANENT: "FailJob", ExitCode.PREEMPTED: "Ignore"}
    assert all(r["onExitCodes"]["containerName"] == container["name"] for r in rules if "onExitCodes" in r)
    assert any(c["type"] == "DisruptionTarget" and r["action"] == "Ignore"
               for r in rules for c in r.get("onPodConditions", []))
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    grace = int(pod_env(container, {})[Env.GRACE_SECONDS])
    assert pod["terminationGracePeriodSeconds"] >= grace + 15  # the save, then the exit
    assert container["command"][:2] == ["elastic-resume", "launch"]


def test_each_indexed_job_pod_finds_node_0_through_the_headless_service():
    service, job = load("indexed-job.yaml")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    for index in range(job["spec"]["completions"]):
        env = {**pod_env(container, {"annotations": {}}), "JOB_COMPLETION_INDEX": str(index),
               "HOSTNAME": f"trainer-{index}"}
        d = detect(env)
        assert (d.platform, d.node_rank, d.nnodes) == ("kubernetes-indexed-job", index, "2")
        assert d.rdzv_endpoint == f"trainer-0.trainer:{DEFAULT_RDZV_PORT}"


def test_each_jobset_pod_finds_node_0():
    [doc] = load("jobset.yaml")
    rjob = doc["spec"]["replicatedJobs"][0]
    container = rjob["template"]["spec"]["template"]["spec"]["containers"][0]
    ranks = set()
    for index in range(rjob["template"]["spec"]["completions"]):
        labels = {"jobset.sigs.k8s.io/jobset-name": doc["metadata"]["name"],
                  "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"], "jobset.sigs.k8s.io/job-index": "0",
                  "jobset.sigs.k8s.io/restart-attempt": "1"}
        env = {**pod_env(container, {"labels": labels}), "JOB_COMPLETION_INDEX": str(index)}
        d = detect(env)
        ranks.add(d.node_rank)
        assert d.platform == "jobset" and d.restart_count == 1
        assert d.rdzv_endpoint == f"train-workers-0-0.train:{DEFAULT_RDZV_PORT}"
    assert ranks == {0, 1}


def test_pytorchjob_pods_take_the_operators_pet_variables():
    [doc] = load("pytorchjob.yaml")
    elastic = doc["spec"]["elasticPolicy"]
    # What the training operator sets for an elastic job (PET_* as torchrun reads them).
    env = {"HOSTNAME": "train-worker-1", "PET_NNODES": f"{elastic['minReplicas']}:{elastic['maxReplicas']}",
           "PET_RDZV_BACKEND": elastic["rdzvBackend"], "PET_RDZV_ENDPOINT": "train-worker-0:29400",
           "PET_NPROC_PER_NODE": doc["spec"]["nprocPerNode"], "PET_MAX_RESTARTS": str(elastic["maxRestarts"])}
    d = detect(env)
    assert d.platform == "pytorchjob" and d.rdzv_id == "pytorchjob-train"
    defaults = d.torchrun_defaults()
    assert "PET_NNODES" not in defaults and "PET_RDZV_ENDPOINT" not in defaults  # the operator's stand


@pytest.fixture
def pod_network():
    reason = netns_missing_reason()
    if reason:
        pytest.skip(reason)
    net = make_pod_network({"trainer-0": ["trainer-0.trainer", "trainer-0"],
                            "trainer-1": ["trainer-1.trainer", "trainer-1"]})
    try:
        yield net
    finally:
        net.teardown()


def pod_command(container, tmp_path, index: int) -> tuple[list[str], dict[str, str]]:
    """The container's command made runnable here: ``elastic-resume`` is this checkout's, the
    model is small (one process per pod, few steps), the checkpoint root and the log volume are
    local directories shared by both "pods" (standing for the S3 bucket and the log volume)."""
    cmd = [sys.executable, "-m", "elastic_resume.cli"]
    for arg in container["command"][1:]:
        if arg.startswith("--nproc-per-node="):
            arg = "--nproc-per-node=1"
        elif arg.startswith("--root="):
            arg = f"--root={tmp_path / 'ckpt'}"
        elif arg.startswith("--steps="):
            arg = "--steps=30"
        elif arg.startswith("--save-every="):
            arg = "--save-every=5"
        elif arg == "launch/train_ddp.py":
            arg = os.path.join(REPO, arg)
        cmd.append(arg)
    cmd += ["--step-seconds=0.05", f"--restore-report={tmp_path / 'restored.jsonl'}", f"--fault-dir={tmp_path}",
            "--die-at-steps=12", "--die-rank=1"]
    env = pod_env(container, {"annotations": {}})
    env["ER_EVENT_LOG"] = str(tmp_path / f"pod-{index}" / "events.jsonl")
    env.update(JOB_COMPLETION_INDEX=str(index), HOSTNAME=f"trainer-{index}")
    return cmd, env


@pytest.mark.slow
def test_indexed_job_two_pods_train_as_one_job_and_survive_a_worker_kill(pod_network, tmp_path):
    _, job = load("indexed-job.yaml")
    container = job["spec"]["template"]["spec"]["containers"][0]
    procs = []
    try:
        for index in (0, 1):
            cmd, env = pod_command(container, tmp_path, index)
            procs.append(start(pod_network.prefix(f"trainer-{index}") + cmd, str(tmp_path / f"pod-{index}.log"),
                               env={**env, "PATH": child_env()["PATH"]}))
            if index == 0:
                time.sleep(1.0)  # node 0 hosts the rendezvous store
        for index, p in enumerate(procs):
            assert p.wait(timeout=240) == 0, (tmp_path / f"pod-{index}.log").read_text()[-3000:]
    finally:
        for p in procs:
            stop(p)
    reports = restores(str(tmp_path / "restored.jsonl"))
    assert [r["restored"] for r in reports[:2]] == [None, None]
    assert [r["restored"] for r in reports[2:]] == [10, 10]  # both pods, the same verified step
    events = read_events(tmp_path / "pod-0" / "events.jsonl") + read_events(tmp_path / "pod-1" / "events.jsonl")
    started = [e for e in events if e["event"] == "launch_started"]
    assert {e["platform"] for e in started} == {"kubernetes-indexed-job"}
    assert any(e["event"] == "restart" for e in events)
    assert all(e["world_size"] == 2 for e in events if e["event"] == "workers_started")


@pytest.mark.parametrize("name", ["indexed-job.yaml", "jobset.yaml", "pytorchjob.yaml"])
def test_manifests_use_the_contracts_names_and_port(name):
    """Every ER_* variable a manifest sets is one the launcher reads, and every port is the
    rendezvous port of the contract (elastic_resume/contract.py)."""
    import re

    text = open(os.path.join(REPO, "k8s", name)).read()
    names = set(re.findall(r"name: (ER_[A-Z0-9_]+)", text))
    assert names and names <= {e.value for e in Env}, names - {e.value for e in Env}
    ports = {int(p) for p in re.findall(r"(?:containerPort|port|targetPort): (\d+)", text)}
    assert ports <= {DEFAULT_RDZV_PORT}, ports
