"""A real one-node Slurm cluster on localhost for the tests and the Slurm benchmark: munged (as
user munge, its own socket, key and files), slurmctld and slurmd (as root), all under one private
directory, all stopped by PID. Built from Debian's ``slurm-wlm`` and ``munge`` packages (``make test`` installs them)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")


def missing_reason() -> str | None:
    """Why a Slurm test cannot run here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd runs jobs as their user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (install the munge package)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class SlurmCluster:
    base: str
    env: dict[str, str]
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(list(cmd), capture_output=True, text=True, env={**os.environ, **self.env}, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        fields: dict[str, str] = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float = 180) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {info.get('JobState')} ({info.get('Reason')})")

    def wait_node_idle(self, timeout: float = 60) -> None:
        """Wait until the node has finished cleaning up after the last job (no COMPLETING):
        a requeued job started while slurmd still tears down its previous run can fail to
        launch."""
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if states and all(s.rstrip("*~#") == "idle" for s in states.split()):
                return
            time.sleep(0.2)
        raise AssertionError(f"node not idle after {timeout}s: {states}")

    def log(self, name: str) -> str:
        path = os.path.join(self.base, f"{name}.log")
        return open(path).read()[-3000:] if os.path.exists(path) else ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
        shutil.rmtree(self.base, ignore_errors=True)


def start_cluster(cpus: int | None = None, cred_expire_s: int | None = None) -> SlurmCluster:
    """``cred_expire_s``: the job credential lifetime, which is also how long a requeued job waits
    before it may start again (Slurm's default: 120 s)."""
    base = tempfile.mkdtemp(prefix="er-slurm-")
    os.chmod(base, 0o755)  # munged (user munge) must reach its own directory below
    munge = pwd.getpwnam("munge")
    mdir = os.path.join(base, "munge")
    os.makedirs(mdir)
    os.chmod(mdir, 0o755)  # munged: "execute permissions for all required" on the socket directory
    key = os.path.join(mdir, "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    for path in (mdir, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    sock = os.path.join(mdir, "munge.socket")
    for sub in ("state", "spool"):
        os.makedirs(os.path.join(base, sub))
    host = socket.gethostname().split(".")[0]
    cpus = cpus or os.cpu_count() or 2
    conf = os.path.join(base, "slurm.conf")
    with open(conf, "w") as f:
        f.write(f"""ClusterName=er-test
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}{f',cred_expire={cred_expire_s}' if cred_expire_s else ''}
CredType=cred/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmdTimeout=30
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = {"SLURM_CONF": conf}
    cluster = SlurmCluster(base=base, env=env)
    try:
        cluster.procs.append(subprocess.Popen(
            ["setpriv", f"--reuid={munge.pw_uid}", f"--regid={munge.pw_gid}", "--clear-groups", _which("munged"),
             "--foreground", f"--socket={sock}", f"--key-file={key}", f"--log-file={mdir}/munged.log",
             f"--pid-file={mdir}/munged.pid", f"--seed-file={mdir}/munged.seed"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(base, "munged.log"), "w")))
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if cluster.procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {cluster.log('munged')}")
            time.sleep(0.05)
        for daemon, flags in (("slurmctld", ["-D", "-i"]), ("slurmd", ["-D"])):
            cluster.procs.append(subprocess.Popen(
                [_which(daemon), *flags], env={**os.environ, **env},
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(base, f"{daemon}.err"), "w")))
        deadline = time.monotonic() + 60
        while True:
            r = cluster.run("sinfo", "-h", "-o", "%t", check=False)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc"):
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in cluster.procs):
                raise RuntimeError(f"Slurm did not come up: {r.stdout} {r.stderr}\n{cluster.log('slurmctld')}\n"
                                   f"{cluster.log('slurmd')}")
            time.sleep(0.2)
    except BaseException:
        cluster.stop()
        raise
    return cluster
