"""Where are we running? Pure functions over an environment mapping (``os.environ``).

The launcher asks :func:`detect` what the scheduler already says about this job (how many nodes,
which one this is, a job id to name the rendezvous, where node 0 lives, how often the job was
restarted) and turns the answer into torchrun defaults (:meth:`Detected.torchrun_defaults`).
Nothing here reads files, resolves names or touches the network, so every branch is unit-tested
with plain dictionaries, and ``elastic-resume doctor`` prints exactly what a launch would use.

Precedence, highest first: a flag on the command line, a ``PET_*`` variable (Kubeflow sets
those; torchrun's parser reads them), then what is detected here.

Supported:

* plain: nothing to detect; torchrun's own defaults (a single node).
* Slurm: inside ``srun`` one launcher per node. ``SLURM_STEP_NUM_NODES`` (or
  ``SLURM_JOB_NUM_NODES``) nodes, node rank ``SLURM_NODEID``, rendezvous id = job id, endpoint =
  the first host of ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST``, restarts =
  ``SLURM_RESTART_COUNT`` (requeues). Outside ``srun`` (straight in the batch script) only this
  node takes part.
* Kubernetes Indexed Job: node rank ``JOB_COMPLETION_INDEX``; node 0 is the pod
  ``<job>-0.<service>`` (pods of an Indexed Job with ``subdomain: <service>`` get these names from
  the headless Service). The manifest passes ``ER_NNODES`` and ``ER_K8S_SERVICE``.
* JobSet: pods are ``<jobset>-<replicated job>-<job index>-<pod index>.<subdomain>``; the
  manifest passes ``JOBSET_NAME``, ``REPLICATED_JOB_NAME``, ``JOB_INDEX`` (downward API) and
  ``ER_NNODES``; ``ER_PODS_PER_JOB`` when a replicated job runs several pods.
* PyTorchJob (Kubeflow training operator): it sets ``PET_*`` (elastic policy) or
  ``MASTER_ADDR``/``WORLD_SIZE``/``RANK`` (one per pod); both are mapped to torchrun settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..contract import DEFAULT_RDZV_PORT, SLURM_RDZV_PORT_BASE, SLURM_RDZV_PORT_SPAN, Env
from ..errors import ConfigError

#: Restarts of the worker group torchrun may do before giving up (torchrun's default is 0).
DEFAULT_MAX_RESTARTS = 3

# Fast failure detection (seconds). torchrun's defaults (5 s keep-alive, 3 misses, 30 s last
# call) take the better part of a minute to drop a dead node; these take about 3 s, and the last
# call still leaves time for nodes started a moment apart to join the same round.
FAST_RDZV_CONF = {"keep_alive_interval": "1", "keep_alive_max_attempt": "3", "last_call_timeout": "5",
                  "join_timeout": "600", "close_timeout": "10"}


@dataclass(frozen=True)
class Detected:
    """What the environment says about this launch (None: not said; torchrun decides)."""

    platform: str
    nnodes: str | None = None
    node_rank: int | None = None
    rdzv_id: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_backend: str | None = None
    nproc_per_node: str | None = None
    restart_count: int = 0
    job_id: str | None = None
    hosts: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def requeue_with_scontrol(self) -> bool:
        return self.platform == "slurm" and self.job_id is not None

    @property
    def is_first_node(self) -> bool:
        return not self.node_rank

    def torchrun_defaults(self) -> dict[str, str]:
        """``PET_*`` variables expressing what was detected (only the ones that were)."""
        out = {"PET_MAX_RESTARTS": str(DEFAULT_MAX_RESTARTS)}
        # The node rank is not passed on: the c10d rendezvous assigns ranks itself (torchrun
        # warns that --node-rank is ignored); it only decides which node requeues.
        for key, value in (("NNODES", self.nnodes), ("RDZV_ID", self.rdzv_id),
                           ("RDZV_ENDPOINT", self.rdzv_endpoint), ("RDZV_BACKEND", self.rdzv_backend),
                           ("NPROC_PER_NODE", self.nproc_per_node)):
            if value is not None:
                out[f"PET_{key}"] = str(value)
        return out


# -- Slurm host lists -----------------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``a[1-2],b`` -> ``['a[1-2]', 'b']``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"bad Slurm host list {text!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"bad Slurm host list {text!r}: unbalanced '['")
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_range(spec: str, whole: str) -> list[str]:
    out: list[str] = []
    for item in spec.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"bad Slurm host list {whole!r}: range {item!r} is not N or N-M")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ConfigError(f"bad Slurm host list {whole!r}: range {item!r} runs backwards")
        width = len(lo)  # node[08-10] keeps the zero padding: node08 node09 node10
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm host list (``node[01-03,7],gpu-[1-2]-x``) into host names, in order."""
    hosts: list[str] = []
    for part in _split_top_level(text):
        m = re.search(r"\[([^\[\]]*)\]", part)
        if m is None:
            hosts.append(part)
            continue
        prefix, suffix = part[: m.start()], part[m.end():]
        for value in _expand_range(m.group(1), text):
            hosts.extend(expand_hostlist(prefix + value + suffix))  # further brackets in the suffix
    return hosts


def first_host(text: str) -> str:
    hosts = expand_hostlist(text)
    if not hosts:
        raise ConfigError(f"empty Slurm host list {text!r}")
    return hosts[0]


# -- detection ------------------------------------------------------------------------------------
def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw.split("(")[0])  # Slurm writes e.g. SLURM_TASKS_PER_NODE=2(x3)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def _port(env: Mapping[str, str]) -> int:
    return _int(env, Env.RDZV_PORT, DEFAULT_RDZV_PORT) or DEFAULT_RDZV_PORT


def slurm_rdzv_port(env: Mapping[str, str], job_id: str) -> int:
    """ER_RDZV_PORT, else a port derived from the job id: jobs that share a node get their own
    rendezvous stores (one fixed port made one job's end take the other down)."""
    given = _int(env, Env.RDZV_PORT)
    if given:
        return given
    number = int(job_id) if job_id.isdigit() else sum(job_id.encode())
    return SLURM_RDZV_PORT_BASE + number % SLURM_RDZV_PORT_SPAN


def _nnodes(env: Mapping[str, str], fixed: int) -> str:
    """``N``, or ``MIN:N`` when ``ER_MIN_NODES`` allows the job to go on with fewer nodes."""
    low = _int(env, Env.MIN_NODES)
    if low is None or low >= fixed:
        return str(fixed)
    if low < 1:
        raise ConfigError(f"{Env.MIN_NODES}={low} must be at least 1")
    return f"{low}:{fixed}"


def detect_slurm(env: Mapping[str, str]) -> Detected | None:
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return None
    restarts = _int(env, "SLURM_RESTART_COUNT", 0) or 0
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if not in_step:
        return Detected(
            platform="slurm", nnodes="1", node_rank=0, rdzv_id=f"slurm-{job_id}", rdzv_backend="c10d",
            rdzv_endpoint=f"localhost:{slurm_rdzv_port(env, job_id)}", restart_count=restarts, job_id=job_id,
            notes=("not inside srun: only this node takes part; run 'srun elastic-resume launch ...' "
                   "with one task per node to use the whole allocation",),
        )
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("Slurm job step without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST")
    hosts = tuple(expand_hostlist(nodelist))
    nnodes = _int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_JOB_NUM_NODES") or _int(env, "SLURM_NNODES") or len(hosts)
    notes = []
    ntasks = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
    if ntasks is not None and ntasks != nnodes:
        notes.append(f"srun started {ntasks} tasks on {nnodes} nodes: run one launcher per node "
                     "(srun --ntasks-per-node=1); the launcher starts the workers")
    return Detected(
        platform="slurm", nnodes=_nnodes(env, nnodes), node_rank=_int(env, "SLURM_NODEID", 0),
        rdzv_id=f"slurm-{job_id}", rdzv_backend="c10d", rdzv_endpoint=f"{hosts[0]}:{slurm_rdzv_port(env, job_id)}",
        restart_count=restarts, job_id=job_id, hosts=hosts, notes=tuple(notes),
    )


def _k8s_nnodes(env: Mapping[str, str], platform: str) -> int:
    n = _int(env, Env.NNODES)
    if n is None or n < 1:
        raise ConfigError(f"{platform}: set ER_NNODES in the pod's environment to the number of pods "
                          "(the Job's completions); Kubernetes does not tell a pod how many there are")
    return n


def detect_jobset(env: Mapping[str, str]) -> Detected | None:
    name = env.get("JOBSET_NAME")
    if not name:
        return None
    rjob = env.get("REPLICATED_JOB_NAME")
    if not rjob:
        raise ConfigError("JobSet: JOBSET_NAME is set but REPLICATED_JOB_NAME is not (pass both from the "
                          "jobset.sigs.k8s.io labels with the downward API)")
    job_index = _int(env, "JOB_INDEX", 0) or 0
    pod_index = _int(env, "JOB_COMPLETION_INDEX", 0) or 0
    pods_per_job = _int(env, Env.PODS_PER_JOB, 1) or 1
    subdomain = env.get(Env.K8S_SERVICE) or name  # JobSet's headless service is named after it
    nnodes = _k8s_nnodes(env, "JobSet")
    host0 = f"{name}-{rjob}-0-0.{subdomain}"
    return Detected(
        platform="jobset", nnodes=_nnodes(env, nnodes), node_rank=job_index * pods_per_job + pod_index,
        rdzv_id=f"jobset-{name}", rdzv_backend="c10d", rdzv_endpoint=f"{host0}:{_port(env)}",
        restart_count=_int(env, "JOBSET_RESTART_ATTEMPT", 0) or 0, job_id=name, hosts=(host0,),
    )


def detect_indexed_job(env: Mapping[str, str]) -> Detected | None:
    index = _int(env, "JOB_COMPLETION_INDEX")
    if index is None:
        return None
    service = env.get(Env.K8S_SERVICE)
    job = env.get(Env.JOB_NAME) or re.sub(r"-\d+$", "", env.get("HOSTNAME", ""))
    if not service or not job:
        raise ConfigError("Kubernetes Indexed Job: set ER_K8S_SERVICE to the headless Service the pods use as "
                          "subdomain (and ER_JOB_NAME if the pod's host name is not <job>-<index>)")
    host0 = f"{job}-0.{service}"
    return Detected(
        platform="kubernetes-indexed-job", nnodes=_nnodes(env, _k8s_nnodes(env, "Indexed Job")), node_rank=index,
        rdzv_id=f"k8s-{job}", rdzv_backend="c10d", rdzv_endpoint=f"{host0}:{_port(env)}",
        restart_count=_int(env, Env.POD_RETRY, 0) or 0, job_id=job, hosts=(host0,),
    )


def detect_pytorchjob(env: Mapping[str, str]) -> Detected | None:
    host = env.get("HOSTNAME", "")
    m = re.fullmatch(r"(.+)-(master|worker)-(\d+)", host)
    elastic = "PET_RDZV_ENDPOINT" in env
    if not elastic and not (m and "MASTER_ADDR" in env and "WORLD_SIZE" in env):
        return None
    name = m.group(1) if m else None
    if elastic:  # the operator set PET_*; torchrun's parser reads them, we only name the rendezvous
        return Detected(platform="pytorchjob", rdzv_id=f"pytorchjob-{name}" if name else None,
                        rdzv_backend=None if "PET_RDZV_BACKEND" in env else "c10d", job_id=name)
    # Non-elastic PyTorchJob: one pod per node, WORLD_SIZE/RANK count pods, the master pod hosts
    # the store. Map that onto a c10d rendezvous at the master's address.
    assert m is not None
    pods = _int(env, "WORLD_SIZE", 1) or 1
    rank = _int(env, "RANK", 0) or 0
    return Detected(
        platform="pytorchjob", nnodes=_nnodes(env, pods), node_rank=rank, rdzv_id=f"pytorchjob-{name}",
        rdzv_backend="c10d", rdzv_endpoint=f"{env['MASTER_ADDR']}:{_port(env)}", job_id=name,
        hosts=(env["MASTER_ADDR"],),
        notes=("PyTorchJob without elasticPolicy: WORLD_SIZE and RANK count pods here, not processes",),
    )


def detect(env: Mapping[str, str]) -> Detected:
    """The first platform whose variables are present (most specific first)."""
    for probe in (detect_slurm, detect_jobset, detect_pytorchjob, detect_indexed_job):
        found = probe(env)
        if found is not None:
            return found
    return Detected(platform="plain")
