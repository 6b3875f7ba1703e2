"""Kubernetes without a cluster: read the manifests under k8s/, check custom resources
structurally, work out the environment each pod would get, and run "pods" as local processes,
each in a network namespace of its own with its own address and /etc/hosts (``ip netns exec``
bind-mounts /etc/netns/NAME/hosts), so pod names such as trainer-0.trainer resolve the way
the headless Service makes them resolve in a cluster."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import uuid
from dataclasses import dataclass, field
from typing import Any

import yaml

from harness.processes import REPO

K8S = os.path.join(REPO, "k8s")


def load(name: str) -> list[dict[str, Any]]:
    with open(os.path.join(K8S, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# Structural schemas for the custom resources, transcribed (the fields these manifests may use)
# from the published CRDs: jobset.x-k8s.io/v1alpha2 JobSet and kubeflow.org/v1 PyTorchJob. The
# embedded Job and Pod templates are validated strictly against Kubernetes' own schema.
JOBSET_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "jobset.x-k8s.io/v1alpha2"}, "kind": {"const": "JobSet"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["replicatedJobs"], "additionalProperties": False,
            "properties": {
                "replicatedJobs": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name", "template"], "additionalProperties": False,
                    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                   "replicas": {"type": "integer", "minimum": 0},
                                   "groupName": {"type": "string"},
                                   "dependsOn": {"type": "array"},
                                   "template": {"type": "object", "required": ["spec"]}}}},
                "network": {"type": "object", "additionalProperties": False, "properties": {
                    "enableDNSHostnames": {"type": "boolean"}, "subdomain": {"type": "string"},
                    "publishNotReadyAddresses": {"type": "boolean"}}},
                "failurePolicy": {"type": "object", "additionalProperties": False, "properties": {
                    "maxRestarts": {"type": "integer", "minimum": 0},
                    "restartStrategy": {"enum": ["Recreate", "BlockingRecreate"]},
                    "rules": {"type": "array", "items": {
                        "type": "object", "required": ["action"], "additionalProperties": False,
                        "properties": {"name": {"type": "string"},
                                       "action": {"enum": ["FailJobSet", "RestartJobSet",
                                                           "RestartJobSetAndIgnoreMaxRestarts"]},
                                       "onJobFailureReasons": {"type": "array", "items": {"enum": [
                                           "BackoffLimitExceeded", "DeadlineExceeded", "PodFailurePolicy",
                                           "MaxFailedIndexesExceeded"]}},
                                       "targetReplicatedJobs": {"type": "array", "items": {"type": "string"}}}}}}},
                "successPolicy": {"type": "object"}, "startupPolicy": {"type": "object"},
                "suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
                "ttlSecondsAfterFinished": {"type": "integer"}, "coordinator": {"type": "object"},
            },
        },
    },
}

_REPLICA_SPEC = {
    "type": "object", "required": ["template"], "additionalProperties": False,
    "properties": {"replicas": {"type": "integer", "minimum": 1},
                   "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
                   "template": {"type": "object", "required": ["spec"]}},
}
PYTORCHJOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"}, "kind": {"const": "PyTorchJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["pytorchReplicaSpecs"], "additionalProperties": False,
            "properties": {
                "nprocPerNode": {"type": "string"},
                "elasticPolicy": {"type": "object", "additionalProperties": False, "properties": {
                    "minReplicas": {"type": "integer", "minimum": 1}, "maxReplicas": {"type": "integer", "minimum": 1},
                    "rdzvBackend": {"enum": ["c10d", "etcd", "etcd-v2"]}, "rdzvHost": {"type": "string"},
                    "rdzvPort": {"type": "integer"}, "rdzvId": {"type": "string"},
                    "rdzvConf": {"type": "array"}, "standalone": {"type": "boolean"},
                    "nProcPerNode": {"type": "integer"}, "maxRestarts": {"type": "integer", "minimum": 0},
                    "metrics": {"type": "array"}}},
                "runPolicy": {"type": "object", "additionalProperties": False, "properties": {
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                    "activeDeadlineSeconds": {"type": "integer"}, "ttlSecondsAfterFinished": {"type": "integer"},
                    "schedulingPolicy": {"type": "object"}, "suspend": {"type": "boolean"},
                    "managedBy": {"type": "string"}}},
                "pytorchReplicaSpecs": {"type": "object", "minProperties": 1, "additionalProperties": False,
                                        "properties": {"Master": _REPLICA_SPEC, "Worker": _REPLICA_SPEC}},
            },
        },
    },
}


def pod_env(container: dict[str, Any], metadata: dict[str, Any]) -> dict[str, str]:
    """The variables a container gets from its manifest, downward-API references resolved
    against ``metadata`` (labels/annotations the controllers put on the pod)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        path = item["valueFrom"]["fieldRef"]["fieldPath"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            env[item["name"]] = str(metadata.get(m.group(1), {}).get(m.group(2), ""))  # missing -> ""
        elif path == "metadata.name":
            env[item["name"]] = metadata["name"]
        else:
            raise AssertionError(f"unsupported fieldRef {path}")
    return env


@dataclass
class PodNetwork:
    """Network namespaces standing for pods: name -> (namespace, address), with /etc/hosts
    entries ``address host-names`` for every pod, and this machine's host name mapped to the
    pod's own address (as a pod's /etc/hosts maps its own name)."""

    pods: dict[str, tuple[str, str]] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=dict)

    def prefix(self, pod: str) -> list[str]:
        return ["ip", "netns", "exec", self.pods[pod][0]]

    def address(self, pod: str) -> str:
        return self.pods[pod][1]

    def teardown(self) -> None:
        for ns, _ in self.pods.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def netns_missing_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"er-probe-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if r.returncode == 0 else f"cannot create network namespaces: {r.stderr.strip()}"


def make_pod_network(pod_names: dict[str, list[str]]) -> PodNetwork:
    """Two (or more) namespaces joined by a bridge-less veth mesh: each pod gets 10.231.N.1/16...
    Implemented for two pods with one veth pair, which is all the tests need."""
    assert len(pod_names) == 2, "two pods"
    tag = uuid.uuid4().hex[:6]
    net = PodNetwork(names=pod_names)
    pods = list(pod_names)
    for i, pod in enumerate(pods):
        net.pods[pod] = (f"er-{tag}-{i}", f"10.231.{int(tag[:2], 16)}.{i + 1}")
    try:
        (ns0, a0), (ns1, a1) = net.pods[pods[0]], net.pods[pods[1]]
        for ns in (ns0, ns1):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "link", "add", f"v{tag}a", "netns", ns0, "type", "veth", "peer", "name", f"v{tag}b",
                        "netns", ns1], check=True)
        for ns, dev, addr in ((ns0, f"v{tag}a", a0), (ns1, f"v{tag}b", a1)):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        me = socket.gethostname()
        for pod in pods:
            ns, addr = net.pods[pod]
            lines = ["127.0.0.1 localhost"]
            for other in pods:
                names = list(pod_names[other]) + ([me] if other == pod else [])
                lines.append(f"{net.pods[other][1]} {' '.join(names)}")
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            with open(f"/etc/netns/{ns}/hosts", "w") as f:
                f.write("\n".join(lines) + "\n")
    except BaseException:
        net.teardown()
        raise
    return net
