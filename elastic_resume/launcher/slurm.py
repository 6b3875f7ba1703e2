"""The sbatch script for a multi-node job (``elastic-resume sbatch`` prints it; ``slurm/train.sbatch``
is this function's output for the example settings, pinned by a golden-file test).

What the script does and why:

* ``--requeue`` and ``--open-mode=append``: a requeued job is the same job id with
  ``SLURM_RESTART_COUNT`` one higher, writing to the same log.
* ``--signal=USR1@<lead>``: Slurm warns the job ``lead`` seconds before its time limit. The
  launcher saves at the next step, requeues the job once (from the first node) and exits 75.
  The launcher's grace (``ER_GRACE_SECONDS``) is set below the lead time so the save is done
  before Slurm's SIGTERM/SIGKILL.
* The batch shell traps USR1 and TERM and passes them to ``srun`` as USR1 (srun forwards signals
  to its tasks), so ``scancel --signal=USR1 --batch`` and a signal to the whole step both work.
* One ``srun`` task per node runs ``elastic-resume launch``; the rendezvous endpoint is the
  first host of the node list (``scontrol show hostnames``), the rendezvous id the job id.
* With fewer minimum nodes than nodes, ``--no-kill`` keeps the allocation when a node fails,
  and the survivors go on at the smaller size.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

from ..contract import SLURM_RDZV_PORT_BASE, SLURM_RDZV_PORT_SPAN, Env, ExitCode
from ..errors import ConfigError


@dataclass(frozen=True)
class SbatchOptions:
    script: str
    script_args: tuple[str, ...] = ()
    job_name: str = "train"
    nodes: int = 2
    min_nodes: int | None = None
    nproc_per_node: int = 1
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str = "24:00:00"
    signal_lead_s: int = 300
    grace_s: int | None = None
    partition: str | None = None
    account: str | None = None
    output: str = "%x-%j.out"  #: in the submit directory: nothing has to exist before the job starts
    rdzv_port: int | None = None  #: None: derived from the job id (see contract.SLURM_RDZV_PORT_BASE)
    launcher: str = "elastic-resume"
    setup: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be at least 1 (got {self.nodes})")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            raise ConfigError(f"--min-nodes must be between 1 and --nodes={self.nodes} (got {self.min_nodes})")
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1 (got {self.nproc_per_node})")
        if self.signal_lead_s < 10:
            raise ConfigError(f"--signal-lead must leave at least 10 s for a save (got {self.signal_lead_s})")
        limit = slurm_seconds(self.time)
        if limit is not None and self.signal_lead_s >= limit:
            raise ConfigError(f"--signal-lead {self.signal_lead_s} s is not shorter than --time {self.time} ({limit} s): "
                              "the warning would come before the job starts")
        if self.grace_s is not None and not 0 < self.grace_s < self.signal_lead_s:
            raise ConfigError(f"--grace ({self.grace_s}) must be positive and below --signal-lead ({self.signal_lead_s})")


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_seconds(text: str) -> int | None:
    """A Slurm time limit in seconds (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``); None for ``UNLIMITED``/``infinite``. Anything else is a ConfigError."""
    if text.strip().lower() in ("unlimited", "infinite"):
        return None
    m = _TIME.match(text.strip())
    if not m:
        raise ConfigError(f"--time {text!r}: not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    assert a is not None
    if days is not None:  # D-HH[:MM[:SS]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:  # HH:MM:SS
        return (a * 60 + (b or 0)) * 60 + c
    return a * 60 + (b or 0)  # MM or MM:SS


_GPU_GRES = re.compile(r"(?:^|,)gpu(?::[\w.-]+)?:(\d+)")


def gpus_per_node_from_gres(lines: list[str]) -> int | None:
    """Pure: the GPUs per node every node of ``sinfo -h -o %G`` lines offers alike (``gpu:8``,
    ``gpu:a100:4(S:0-1)``); None on a CPU cluster, or when the nodes differ (then say it)."""
    counts = set()
    for line in (ln.strip() for ln in lines if ln.strip()):
        found = [int(n) for n in _GPU_GRES.findall(line)]
        counts.add(sum(found))
    counts.discard(0)
    return counts.pop() if len(counts) == 1 and all(c for c in counts) else None


def cluster_gpus_per_node() -> int | None:
    """What this cluster's nodes offer, from ``sinfo`` (None where sinfo is missing, fails, or
    the nodes have no GPUs): the generator's default, so the script runs where it is made."""
    if shutil.which("sinfo") is None:
        return None
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return gpus_per_node_from_gres(r.stdout.splitlines()) if r.returncode == 0 else None


def default_grace(lead_s: int) -> int:
    """Time the workers get to save: the signal lead minus a margin for the requeue and exit."""
    return max(5, lead_s - max(5, lead_s // 5))


def render_sbatch(o: SbatchOptions) -> str:
    o.check()
    q = shlex.quote
    grace = o.grace_s if o.grace_s is not None else default_grace(o.signal_lead_s)
    elastic = o.min_nodes is not None and o.min_nodes < o.nodes
    nnodes = f"{o.min_nodes}:{o.nodes}" if elastic else str(o.nodes)
    directives = [f"--job-name={o.job_name}", f"--nodes={o.nodes}", "--ntasks-per-node=1"]
    if o.gpus_per_node:
        directives.append(f"--gpus-per-node={o.gpus_per_node}")
    if o.cpus_per_task:
        directives.append(f"--cpus-per-task={o.cpus_per_task}")
    if o.partition:
        directives.append(f"--partition={o.partition}")
    if o.account:
        directives.append(f"--account={o.account}")
    directives += [f"--time={o.time}", "--requeue", f"--signal=USR1@{o.signal_lead_s}", "--open-mode=append",
                   f"--output={o.output}"]
    if elastic:
        directives.append("--no-kill")
    env = {Env.GRACE_SECONDS.value: str(grace), **o.extra_env}
    launch = [*shlex.split(o.launcher), "launch", f"--nnodes={nnodes}", f"--nproc-per-node={o.nproc_per_node}",
              "--rdzv-backend=c10d", '--rdzv-endpoint="$head:$port"', '--rdzv-id="slurm-$SLURM_JOB_ID"',
              q(o.script), *(q(a) for a in o.script_args)]
    launch_line = " ".join(launch)  # the rendezvous flags stay double-quoted: the shell fills in $head
    lines = [
        "#!/bin/bash",
        "# Generated by elastic-resume (elastic_resume/launcher/slurm.py). Regenerate with:",
        "#   elastic-resume sbatch --help",
        *(f"#SBATCH {d}" for d in directives),
        "",
        f"# Exit codes of 'elastic-resume launch': {ExitCode.OK} done; {ExitCode.PREEMPTED} preempted after a "
        "committed save (the",
        f"# launcher on the first node has requeued the job); {ExitCode.GAVE_UP} gave up, {ExitCode.PERMANENT} an error no",
        "# restart can heal (a bad root, option or state): do not resubmit.",
        "set -u",
        *(f"export {k}={q(v)}" for k, v in sorted(env.items())),
        *o.setup,
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "# A rendezvous port of this job's own: jobs sharing a node must not share one store.",
        (f"port={o.rdzv_port}" if o.rdzv_port else
         f"port=${{ER_RDZV_PORT:-$(( {SLURM_RDZV_PORT_BASE} + SLURM_JOB_ID % {SLURM_RDZV_PORT_SPAN} ))}}"),
        'echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST '
        '(rendezvous $head:$port)"',
        "",
        "# USR1 from --signal (or scancel --signal=USR1 --batch) and TERM reach this shell; pass them",
        "# to srun as USR1, which forwards them to the launchers: save at the next step, then requeue.",
        'forward() { [ -n "${srun_pid:-}" ] && kill -USR1 "$srun_pid" 2>/dev/null; }',
        "trap forward USR1 TERM",
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=0 {launch_line} &",
        "srun_pid=$!",
        'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done',
        'wait "$srun_pid"; rc=$?',
        "# srun reports every exit but 0 as an error; say what this one means.",
        'case $rc in',
        '  0) what="finished" ;;',
        f'  {ExitCode.PREEMPTED}) what="preempted after a committed save, not an error (the summary above says if the job '
        'was requeued)" ;;',
        f'  {ExitCode.GAVE_UP}) what="gave up: the loss-spike rollback budget is spent; do not resubmit as is" ;;',
        f'  {ExitCode.PERMANENT}) what="an error no restart can heal (the line above names it); do not resubmit as is" ;;',
        '  *) what="failed" ;;',
        'esac',
        'echo "$(date -Is) job $SLURM_JOB_ID step ended with exit code $rc: $what"',
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


#: The settings ``slurm/train.sbatch`` is rendered from (the golden-file test re-renders them).
EXAMPLE = SbatchOptions(
    script="launch/train_ddp.py",
    script_args=("--root", "s3://my-bucket/runs/exp1", "--steps", "100000", "--save-every", "500", "--guard"),
    job_name="train", nodes=4, min_nodes=3, nproc_per_node=8, gpus_per_node=8, cpus_per_task=64,
    time="24:00:00", signal_lead_s=300, output="logs/%x-%j.out",
    setup=("source .venv/bin/activate",),
)
