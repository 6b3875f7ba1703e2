"""``elastic-resume launch``: torchrun's launcher plus what a long training job needs.

It is torchrun underneath: the same argument parser (``torch.distributed.run.get_args_parser``,
so every torchrun flag and ``PET_*`` variable works), the same rendezvous and the same
``LocalElasticAgent`` restarting the worker group. On top of it:

* defaults from the scheduler (:mod:`elastic_resume.env`: Slurm, Kubernetes), restarts on by
  default, and rendezvous keep-alives that drop a dead node in about 3 s instead of ~45 s;
* ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: without it, gloo restarts on torch 2.13 fail with
  "connectFullMesh: Connection refused";
* workers run under :mod:`elastic_resume.worker` (they die with the launcher, and preemption
  signals become a flag the spike vote carries);
* preemption: SIGUSR1 or SIGTERM to the launcher is forwarded to the workers as SIGUSR1; they
  save at the next step boundary and exit 75; the launcher waits at most ``--er-grace`` seconds,
  requeues the Slurm job once (from the first node) and exits 75;
* exit codes are a contract: 0 done, 75 preempted (safe to requeue), 76 gave up (the spike
  guard's budget is spent, or nothing verifiable to resume from) and 78 an error no restart can
  heal (a bad root, option or state): never restarted, because a restart would fail the same way;
* events (restarts with their cause, preemptions, the workers' saves, rollbacks and step
  losses) go to one JSONL file per node, and a summary is printed at the end
  (``elastic-resume report`` makes the same summary and a plot from the files).

The agent's hooks (when workers start, fail and restart) are internals of torch's
``SimpleElasticAgent``; they, like every other torch internal, are reached through
``elastic_resume._torch_compat``, which names the torch releases they were written for. The
launcher tests exercise each of them.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .. import _torch_compat, heartbeat
from ..contract import DEFAULT_GRACE_SECONDS, DEFAULT_MASTER_PORT, DEFAULT_MAX_RESUMES_PER_STEP, Env, Event, ExitCode, StrEnum
from ..errors import ConfigError, ElasticResumeError
from ..events import EventLog
from ..storage import is_secret_name, redact, redact_argv
from ..storage.secrets import MASK
from . import detect as envmod
from .hangs import AgentWatch, HangWatch, Hung, dump_stacks
from .worker import EXEC

#: What each worker process runs first (see ``worker.py``).
WORKER_MODULE = "elastic_resume.launcher.worker"
#: torchrun's agent turns these into an exception that kills the workers at once; SIGTERM and
#: SIGUSR1 are ours (a save first).
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


class Requeue(StrEnum):
    """Whether the launcher requeues a Slurm job after a preemption save (``--er-requeue``)."""

    AUTO = "auto"  #: from the first node only
    ALWAYS = "always"  #: from every node
    NEVER = "never"  #: leave it to the batch script


class Outcome(StrEnum):
    """Why a launch stopped restarting its workers (None while it may restart them)."""

    GAVE_UP = "gave_up"  #: a worker exited 76
    PERMANENT = "permanent"  #: a worker exited 78: an error no restart heals
    PREEMPTED = "preempted"  #: a worker exited 75 after a committed save
    PREEMPT_TIMEOUT = "preempt_timeout"  #: the workers did not save within the grace period
    PREEMPT_FAILED = "preempt_failed"  #: the workers failed after a preemption signal, before saving
    EXCLUDED = "excluded"  #: a worker asked for this node to leave the job (a persistent straggler)


@dataclass
class LaunchPlan:
    """Everything a launch will do, decided before anything starts (``doctor`` prints it)."""

    detected: envmod.Detected
    args: argparse.Namespace
    config: Any  # torch.distributed.launcher.api.LaunchConfig
    cmd: str
    cmd_args: list[str]
    event_log: str
    grace_s: float
    requeue: Requeue
    worker_env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> list[tuple[str, str]]:
        c = self.config
        d = self.detected
        return [
            ("platform", d.platform + (f" (job {d.job_id})" if d.job_id else "")),
            ("scheduler restarts so far", str(d.restart_count)),
            ("nodes", f"{c.min_nodes}" if c.min_nodes == c.max_nodes else f"{c.min_nodes}:{c.max_nodes} (elastic)"),
            ("node rank", str(self.args.node_rank) if c.rdzv_backend == "static" else
             f"{d.node_rank if d.node_rank is not None else '-'} from the scheduler (the rendezvous assigns ranks)"),
            ("processes per node", str(c.nproc_per_node)),
            ("rendezvous", f"{c.rdzv_backend} at {c.rdzv_endpoint or '-'} id {c.run_id}"),
            ("rendezvous settings", ", ".join(f"{k}={v}" for k, v in sorted(c.rdzv_configs.items()))),
            ("worker-group restarts allowed", str(c.max_restarts)),
            ("preemption", f"SIGUSR1/SIGTERM -> save at the next step, wait up to {self.grace_s:g} s, "
                           + ("requeue with scontrol, " if self.will_requeue else "")
                           + f"exit {ExitCode.PREEMPTED}"),
            ("hang timeout", "off" if self.args.er_hang_timeout == 0 else
             "learned from the step time (at least 60 s)" if self.args.er_hang_timeout is None else
             f"{self.args.er_hang_timeout:g} s"),
            ("event log", self.event_log),
            ("worker command", " ".join(redact_argv([self.cmd, *self.cmd_args]))),
            *[(f"env {k}", MASK if is_secret_name(k) else redact(v)) for k, v in sorted(self.worker_env.items())],
            *[("note", n) for n in d.notes],
        ]

    @property
    def will_requeue(self) -> bool:
        if self.requeue == Requeue.NEVER:
            return False
        return self.detected.requeue_with_scontrol and (self.requeue == Requeue.ALWAYS or self.detected.is_first_node)


def _number(kind: type, env: str, *, minimum: float, strict: bool = False):  # type: ignore[no-untyped-def]
    """argparse type for a flag whose default comes from ``env`` (string defaults are converted
    too, so a bad variable gets the same one-line error, naming it): a finite number of ``kind``
    at least ``minimum`` (above it, when ``strict``). NaN would make every comparison false: a
    grace period of NaN never expires."""
    what = "an integer" if kind is int else "a number"
    bound = f"{'>' if strict else '>='} {minimum:g}"

    def parse(text: str):  # type: ignore[no-untyped-def]
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (from the flag or {env})") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} {bound} (from the flag or {env})")
        return value
    return parse


def _hang_timeout(text: str) -> float | None:
    """``auto`` (None: learned) or seconds >= 0 (0: off)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value: float = _number(float, Env.HANG_TIMEOUT, minimum=0)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or auto") from None
    return value


def add_own_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("elastic-resume (also from ER_* variables)")
    g.add_argument("--er-event-log", default=os.environ.get(Env.EVENT_LOG),
                   help="JSONL file for this node's events (default: elastic-resume-logs/<run id>/<host>-<pid>.jsonl)")
    g.add_argument("--er-grace", type=_number(float, Env.GRACE_SECONDS, minimum=0, strict=True),
                   default=os.environ.get(Env.GRACE_SECONDS, str(DEFAULT_GRACE_SECONDS)),
                   help=f"seconds the workers get to save after a preemption signal (default {DEFAULT_GRACE_SECONDS}; "
                        "keep it under Slurm's --signal lead time and Kubernetes' terminationGracePeriodSeconds)")
    g.add_argument("--er-requeue", choices=[r.value for r in Requeue], default=os.environ.get(Env.REQUEUE, Requeue.AUTO.value),
                   help="after a preemption under Slurm: auto = 'scontrol requeue' from the first node (default)")
    g.add_argument("--er-max-resumes-per-step", type=_number(int, Env.MAX_RESUMES_PER_STEP, minimum=0),
                   default=os.environ.get(Env.MAX_RESUMES_PER_STEP, str(DEFAULT_MAX_RESUMES_PER_STEP)),
                   help="resumes from the same step, with no newer commit in between, before restore falls back "
                        "to an older verified step (a crash loop); 0 disables (default 3)")
    g.add_argument("--er-hang-timeout", type=_hang_timeout, default=os.environ.get(Env.HANG_TIMEOUT, "auto"),
                   help="seconds a worker may make no progress before it is declared hung, its stack kept and the "
                        "group restarted; auto (default): 20x the median step, at least 60 s (300 s before three "
                        "steps), ten times that during a save, restore or rollback; 0 disables")
    g.add_argument("--er-no-fast-failure-detection", action="store_true",
                   help="keep torchrun's rendezvous timeouts instead of detecting a dead node in ~3 s")
    g.add_argument("--er-no-summary", action="store_true", help="do not print the run summary at the end")


def build_parser() -> argparse.ArgumentParser:
    parser = _torch_compat.launcher_api().get_args_parser()
    parser.prog = "elastic-resume launch"
    # Every argument after the script is the script's. torchrun's parser also matches abbreviations
    # there, so a script flag like --log fails with "ambiguous option: --log could match --log-dir".
    parser.allow_abbrev = False
    parser.description = "torchrun with verified resume, preemption saves and requeue (all torchrun flags work)"
    add_own_options(parser)
    return parser


def _check_sizes(args: argparse.Namespace) -> None:
    """torchrun's parser takes --nnodes and --nproc-per-node as strings and fails deep inside
    (or not at all) on bad ones: refuse them here, naming the flag."""
    parse_min_max_nnodes = _torch_compat.launcher_api().parse_min_max_nnodes
    try:
        low, high = parse_min_max_nnodes(str(args.nnodes))
    except (ValueError, IndexError, RuntimeError):  # torch raises RuntimeError for "1:2:3"
        raise ConfigError(f"--nnodes {args.nnodes!r}: expected a number of nodes N or a range MIN:MAX") from None
    if low < 1 or high < low:
        raise ConfigError(f"--nnodes {args.nnodes!r}: expected 1 <= MIN <= MAX")
    nproc = str(args.nproc_per_node)
    if nproc not in ("auto", "cpu", "gpu", "xpu") and not (nproc.isdigit() and int(nproc) >= 1):
        raise ConfigError(f"--nproc-per-node {nproc!r}: expected a positive number of processes, or auto, cpu, gpu")


def _standalone(args: argparse.Namespace) -> None:
    """torchrun's own single-node shortcut (``torch.distributed.run.run`` does this too)."""
    parse_min_max_nnodes = _torch_compat.launcher_api().parse_min_max_nnodes
    if args.standalone:
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    elif args.rdzv_backend == "static" and not args.rdzv_endpoint and args.master_port is None:
        if parse_min_max_nnodes(args.nnodes)[1] == 1:
            args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = DEFAULT_MASTER_PORT


def plan_launch(argv: list[str], *, check_script: bool = True, script_optional: bool = False) -> LaunchPlan:
    """Parse ``argv`` as torchrun would, with the detected defaults in place. The detected
    defaults go into ``os.environ`` as ``PET_*`` variables (only where none is set) because
    torchrun's parser takes its defaults from there."""
    detected = envmod.detect(os.environ)
    for key, value in detected.torchrun_defaults().items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    if script_optional:
        _torch_compat.make_script_optional(parser, "SCRIPT")
    args = parser.parse_args(argv)
    _check_sizes(args)
    if args.run_path:
        raise ConfigError("--run-path runs the script inside the launcher process (torchrun's own flag for "
                          "that); elastic-resume launch needs worker processes it can signal, restart and outlive: "
                          "drop --run-path")
    if check_script and not args.no_python and not args.module and not os.path.isfile(args.training_script):
        raise ConfigError(f"training script {args.training_script!r} not found")
    if args.er_requeue not in tuple(Requeue):
        raise ConfigError(f"{Env.REQUEUE}={args.er_requeue!r}: expected auto, always or never")
    if args.er_grace <= 0:
        raise ConfigError(f"--er-grace must be positive (got {args.er_grace})")
    _standalone(args)
    try:
        config, cmd, cmd_args = _torch_compat.launcher_api().config_from_args(args)
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"bad launch flags: {e}") from None
    assert isinstance(cmd, str)
    if not args.no_python:
        # python -u [-m] SCRIPT ARGS  ->  python -u -m elastic_resume.worker [-m] SCRIPT ARGS
        cmd_args = [cmd_args[0], "-m", WORKER_MODULE, *cmd_args[1:]]
    else:
        # PROGRAM ARGS  ->  python -m elastic_resume.worker --exec PROGRAM ARGS: the program
        # replaces that process, keeping the death signal (no orphans after a SIGKILLed launcher).
        cmd, cmd_args = sys.executable, ["-m", WORKER_MODULE, EXEC, cmd, *cmd_args]
    if config.rdzv_backend in ("c10d", "etcd-v2") and not args.er_no_fast_failure_detection:
        for key, value in envmod.FAST_RDZV_CONF.items():
            config.rdzv_configs.setdefault(key, value)
    config.signals_to_handle = AGENT_SIGNALS
    event_log = args.er_event_log or os.path.join(
        "elastic-resume-logs", str(config.run_id or "local"), f"{socket.gethostname()}-{os.getpid()}.jsonl")
    worker_env = {
        Env.EVENT_LOG.value: os.path.abspath(event_log),
        Env.LAUNCHER_PID.value: str(os.getpid()),
        Env.RUN_ID.value: str(config.run_id),
        Env.MAX_RESUMES_PER_STEP.value: str(args.er_max_resumes_per_step),
        Env.DISABLE_SHARE_RDZV_TCP_STORE.value: "1",
        # The fewest nodes the job may go on with: a guard that would exclude a straggler's node
        # does so only while that many remain.
        Env.MIN_NODES.value: str(config.min_nodes),
    }
    return LaunchPlan(detected=detected, args=args, config=config, cmd=cmd, cmd_args=list(cmd_args),
                      event_log=os.path.abspath(event_log), grace_s=args.er_grace, requeue=Requeue(args.er_requeue),
                      worker_env=worker_env)


# -- running --------------------------------------------------------------------------------------
def _describe_failures(failures: dict[int, Any]) -> list[dict[str, Any]]:
    out = []
    for rank, f in sorted(failures.items()):
        code = f.exitcode
        item: dict[str, Any] = {"rank": rank, "exitcode": code}
        if code is not None and code < 0:
            try:
                item["signal"] = signal.Signals(-code).name
            except ValueError:
                pass
        out.append(item)
    return out


class _PreemptedBeforeStart(ElasticResumeError):
    """A preemption signal arrived while no workers were running (rendezvous): nothing to save."""


class Launch:
    """One launcher process: the agent, its hooks, the signals, the exit code."""

    def __init__(self, plan: LaunchPlan) -> None:
        self.plan = plan
        self.events = EventLog(plan.event_log)
        self.agent: Any = None
        self.started = time.time()
        self.preempt_at: float | None = None
        self.preempt_signal: str | None = None
        self.outcome: Outcome | None = None
        self.last_failure: list[dict[str, Any]] | None = None
        self.generation = 0
        self.phase = "starting"  # starting -> running (workers started once) -> done
        self.node = socket.gethostname()
        self.ranks: dict[int, int] = {}  # local rank -> global rank, of the current generation
        self.watch: HangWatch | None = None
        self.heartbeat_dir: str | None = None  # the workers' progress records (hangs, a node leaving)
        self.agent_watch: AgentWatch | None = None  # the agent's own loop (blocked on a lost rendezvous)
        self.pids: dict[int, int] = {}  # local rank -> PID of the running workers, as last seen

    def emit(self, event: str, **fields: Any) -> None:
        self.events.emit(event, node=self.node, pid=os.getpid(), **fields)

    # -- signals ------------------------------------------------------------------------------
    def on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.preempt_at is not None:
            self.emit(Event.PREEMPTION_SIGNAL_REPEATED, signal=name)
            return
        self.preempt_at, self.preempt_signal = time.monotonic(), name
        pids = self._worker_pids()
        self.emit(Event.PREEMPTION_REQUESTED, signal=name, grace_s=self.plan.grace_s, workers=len(pids))
        if self.phase == "starting":  # still in the first rendezvous: nothing to save, stop now
            raise _PreemptedBeforeStart(name)
        self._forward_preemption(pids)

    def _forward_preemption(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:  # exited meanwhile
                pass

    def _worker_pids(self) -> list[int]:
        return _torch_compat.worker_pids(self.agent) if self.agent is not None else []

    # -- agent hooks --------------------------------------------------------------------------
    def on_started(self, agent: Any, worker_group: Any) -> None:
        self.generation += 1
        self.phase = "running"
        self.ranks = {w.local_rank: w.global_rank for w in worker_group.workers}
        spec = worker_group.spec
        self.emit(Event.WORKERS_STARTED, generation=self.generation, group_rank=worker_group.group_rank,
                  group_world_size=worker_group.group_world_size, local_world_size=spec.local_world_size,
                  world_size=worker_group.group_world_size * spec.local_world_size if worker_group.group_world_size else None)
        if self.preempt_at is not None:  # a signal came during the restart: pass it on at once
            self._forward_preemption(self._worker_pids())

    def on_monitor(self, agent: Any, result: Any) -> Any:
        from torch.distributed.elastic.agent.server.api import RunResult, WorkerState

        self.pids = _torch_compat.local_worker_pids(agent)
        if self.agent_watch is not None:
            if result.state == WorkerState.HEALTHY:
                self.agent_watch.tick()
            else:
                self.agent_watch.pause()  # the agent stops, restarts or re-forms the group now
        if result.state == WorkerState.FAILED:
            failures = _describe_failures(result.failures)
            codes = {f["exitcode"] for f in failures}
            if ExitCode.GAVE_UP in codes:
                self.outcome = Outcome.GAVE_UP
            elif ExitCode.PERMANENT in codes:
                self.outcome = Outcome.PERMANENT
            elif self.preempt_at is not None or ExitCode.PREEMPTED in codes:
                self.outcome = Outcome.PREEMPTED if ExitCode.PREEMPTED in codes else Outcome.PREEMPT_FAILED
            elif self._leaving():
                self.outcome = Outcome.EXCLUDED
            self.last_failure = failures
            if self.outcome is not None:
                _torch_compat.forbid_restarts(agent)  # never restart after these
            if self.outcome == Outcome.EXCLUDED:
                self.emit(Event.NODE_EXCLUDED, generation=self.generation, failures=failures,
                          reason=f"a worker of {self.node} asked for this node to leave the job (a persistent "
                                 "straggler): it is not restarted, and the other nodes go on without it")
                return result
            # A preemption is the run working as designed: an INFO line, not a WARNING one.
            self.emit(Event.WORKERS_PREEMPTED if self.outcome == Outcome.PREEMPTED else Event.WORKERS_FAILED,
                      generation=self.generation, failures=failures,
                      restarts_left=_torch_compat.remaining_restarts(agent))
        elif result.state == WorkerState.HEALTHY and self.preempt_at is not None:
            if time.monotonic() - self.preempt_at > self.plan.grace_s:
                self.outcome = Outcome.PREEMPT_TIMEOUT
                _torch_compat.forbid_restarts(agent)
                self.emit(Event.PREEMPTION_GRACE_EXPIRED, grace_s=self.plan.grace_s)
                return RunResult(state=WorkerState.FAILED)
        elif result.state == WorkerState.HEALTHY and self.watch is not None:
            workers = {lr: (self.ranks.get(lr, lr), pid) for lr, pid in self.pids.items()}
            hung = self.watch.check(workers)
            if hung:
                if self.agent_watch is not None:
                    self.agent_watch.pause()
                self._report_hang(hung, workers)
                return RunResult(state=WorkerState.FAILED)  # the agent restarts the group (or gives up)
        return result

    def _leaving(self) -> bool:
        """A worker of this generation asked for its node to leave (``heartbeat.leave``)."""
        if self.heartbeat_dir is None:
            return False
        return any((b := heartbeat.read(self.heartbeat_dir, lr)) is not None and b.section == heartbeat.Section.LEAVING
                   for lr in self.ranks)

    def _report_hang(self, hung: list[Hung], workers: dict[int, tuple[int, int]]) -> None:
        assert self.watch is not None
        out_dir = os.path.join(os.path.dirname(os.path.abspath(self.plan.event_log)),
                               f"hang-{self.node}-{os.getpid()}-generation-{self.generation}")
        how = dump_stacks(workers, self.watch.directory, out_dir)
        for h in hung:  # stuck for good (a stopped one would not even take the agent's SIGTERM)
            try:
                os.kill(h.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        suspect = hung[0]
        self.emit(Event.HANG_DETECTED, rank=suspect.rank, local_rank=suspect.local_rank, host=self.node,
                  section=suspect.section, step=suspect.step, seconds=suspect.seconds, limit_s=suspect.limit_s,
                  process_state=suspect.process_state, generation=self.generation,
                  stalled=[{"rank": h.rank, "section": h.section, "step": h.step, "seconds": h.seconds,
                            "process_state": h.process_state} for h in hung],
                  stacks=out_dir, stacks_read={str(r): v for r, v in sorted(how.items())},
                  reason=f"rank {suspect.rank} on {self.node} made no progress for {suspect.seconds:g} s in its "
                         f"{suspect.section} section (limit {suspect.limit_s:g} s; process {suspect.process_state}); "
                         f"{len(hung)} rank(s) of this node stalled; stacks in {out_dir}")
        self.last_failure = [{"rank": h.rank, "exitcode": None, "signal": None, "hang": str(h.section)} for h in hung[:1]]

    def _cut_off(self, seconds: float) -> None:
        """From the agent watch's thread: the agent's loop has been blocked on the rendezvous
        store for ``seconds`` (its host cut off). This node cannot rejoin the job: it leaves it
        now, its workers killed by PID, with exit 1, instead of sitting until the store's
        timeouts; the nodes that still reach the rendezvous go on (``--nnodes MIN:MAX``)."""
        where = redact(self.plan.config.rdzv_endpoint or "") or "the rendezvous"
        reason = (f"the agent has been blocked on the rendezvous store at {where} for {seconds:g} s (longer than "
                  "the hang timeout): this node is cut off from the job (a network partition, or the store's host "
                  "is gone); it leaves, and the nodes that reach the rendezvous go on without it")
        self.emit(Event.RENDEZVOUS_LOST, seconds=seconds, endpoint=where, generation=self.generation, reason=reason)
        for pid in self.pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        print(f"elastic-resume launch: {reason}", file=sys.stderr, flush=True)
        self._finish(int(ExitCode.FAILED), "cut off from the rendezvous")
        if self.heartbeat_dir is not None:
            shutil.rmtree(self.heartbeat_dir, ignore_errors=True)
        os._exit(int(ExitCode.FAILED))  # the main thread is blocked in torch's C++ store client

    def on_restart(self, agent: Any) -> None:
        if self.agent_watch is not None:
            self.agent_watch.pause()
        if self.watch is not None:
            self.watch.reset()
        cause = {"failures": self.last_failure} if self.last_failure else {"cause": "membership change"}
        self.emit(Event.RESTART, generation=self.generation, **cause)
        self.last_failure = None

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> int:
        os.environ.update(self.plan.worker_env)
        self.emit(Event.LAUNCH_STARTED, platform=self.plan.detected.platform, job_id=self.plan.detected.job_id,
                  scheduler_restarts=self.plan.detected.restart_count, run_id=self.plan.config.run_id,
                  nnodes=f"{self.plan.config.min_nodes}:{self.plan.config.max_nodes}",
                  nproc_per_node=self.plan.config.nproc_per_node,
                  cmd=redact_argv([self.plan.cmd, *self.plan.cmd_args]))
        # The job log (Slurm's, a pod's) says where the structured story of this run is kept.
        print(f"elastic-resume: events of this run go to {self.plan.event_log}", file=sys.stderr, flush=True)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self.on_signal)
        # The workers' progress records: in memory where the system offers a tmpfs.
        self.heartbeat_dir = tempfile.mkdtemp(prefix="er-heartbeat-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.environ[Env.HEARTBEAT_DIR] = self.heartbeat_dir
        if self.plan.args.er_hang_timeout != 0:
            watch = self.watch = HangWatch(self.heartbeat_dir, self.plan.args.er_hang_timeout)
            interval = self.plan.config.monitor_interval
            self.agent_watch = AgentWatch(lambda: watch.limit(heartbeat.Section.STEP) + 2 * interval, self._cut_off)
        try:
            code, reason = self._run_agent()
        finally:
            if self.agent_watch is not None:
                self.agent_watch.pause()
            shutil.rmtree(self.heartbeat_dir, ignore_errors=True)
        if code == ExitCode.PREEMPTED:
            # The save is done: a later signal has nothing to add. Our own requeue makes Slurm
            # TERM the step at once, and Python puts SIGTERM back to its default while it shuts
            # down: ignored (SIG_IGN outlives that), so the step ends with 75, not 143.
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
            if self.plan.will_requeue:
                reason = f"{reason}; {self._requeue()}"
        self._finish(code, reason)
        return code

    def _finish(self, code: int, reason: str) -> None:
        self.emit(Event.LAUNCH_FINISHED, exit_code=code, reason=reason, seconds=round(time.time() - self.started, 3))
        if not self.plan.args.er_no_summary:
            from ..report import load_events, summarize

            # This run's events only: an --er-event-log reused by other runs holds theirs too.
            logs = load_events([self.plan.event_log])
            print(summarize(logs.of_run(str(self.plan.config.run_id))).text(), file=sys.stderr, flush=True)

    def _run_agent(self) -> tuple[int, str]:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        agent, signalled = None, False
        try:
            agent = self._make_agent()
            result = agent.run()
        except _PreemptedBeforeStart as e:
            return ExitCode.PREEMPTED, f"{e} before the workers started: nothing to save"
        except SignalException as e:
            signalled = True  # like torchrun: keep the rendezvous open for the other nodes
            return 128 + int(e.sigval), f"stopped by {signal.Signals(e.sigval).name}"
        except Exception as e:  # noqa: BLE001 - rendezvous timeouts, a closed rendezvous: one line, exit 1
            self.emit(Event.LAUNCH_ERROR, error=f"{type(e).__name__}: {e}")
            print(f"elastic-resume launch: {type(e).__name__}: {e}", file=sys.stderr)
            return ExitCode.FAILED, f"{type(e).__name__}: {e}"
        finally:
            self.phase = "done"
            # An excluded node leaves the rendezvous open: the other nodes go on through it.
            if agent is not None and not signalled and self.outcome != Outcome.EXCLUDED:
                self._close_rendezvous(agent)
        if not result.is_failed():
            return 0, "finished"
        if self.outcome == Outcome.EXCLUDED:
            # Not a failure of the job: it goes on without this node (exit 0, like a node that is done).
            return 0, "this node left the job (a persistent straggler); the other nodes go on without it"
        if self.outcome == Outcome.GAVE_UP:
            return ExitCode.GAVE_UP, f"gave up (exit {ExitCode.GAVE_UP} from a worker: not retried)"
        if self.outcome == Outcome.PERMANENT:
            return ExitCode.PERMANENT, (f"an error no restart can heal (exit {ExitCode.PERMANENT} from a worker: "
                                        "not retried; the worker's line above says what)")
        if self.outcome == Outcome.PREEMPTED:
            return ExitCode.PREEMPTED, f"preempted by {self.preempt_signal or 'a worker'} after a committed save"
        if self.outcome in (Outcome.PREEMPT_TIMEOUT, Outcome.PREEMPT_FAILED):
            # Still safe to requeue: checkpoints are atomic, the next run resumes from the last one.
            return ExitCode.PREEMPTED, (f"preempted by {self.preempt_signal}; the workers did not save within "
                                        f"{self.plan.grace_s:g} s" if self.outcome == Outcome.PREEMPT_TIMEOUT
                                        else f"preempted by {self.preempt_signal}; the workers failed before saving")
        if result.failures:
            print(ChildFailedError(name=self.plan.args.training_script, failures=result.failures).format_msg(),
                  file=sys.stderr)
        return ExitCode.FAILED, "workers failed and no restarts are left"

    def _close_rendezvous(self, agent: Any) -> None:
        """As torchrun does when its agent ends (except on a signal): close this run's
        rendezvous so agents on other nodes stop waiting for this one."""
        try:
            _torch_compat.close_rendezvous(agent)
        except Exception as e:  # noqa: BLE001 - already closed by another node, or its store is gone
            self.emit(Event.RENDEZVOUS_CLOSE_FAILED, error=str(e))

    def _make_agent(self) -> Any:
        from torch.distributed.elastic.agent.server.api import WorkerSpec
        from torch.distributed.elastic.rendezvous import RendezvousParameters
        from torch.distributed.elastic.rendezvous import registry as rdzv_registry
        config = self.plan.config
        if not config.run_id:
            config.run_id = str(uuid.uuid4().int)
        os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = config.signals_to_handle
        params = RendezvousParameters(backend=config.rdzv_backend, endpoint=config.rdzv_endpoint,
                                      run_id=config.run_id, min_nodes=config.min_nodes, max_nodes=config.max_nodes,
                                      local_addr=config.local_addr, **config.rdzv_configs)
        master_addr, master_port = _torch_compat.get_addr_and_port(params)
        spec = WorkerSpec(
            role=config.role, local_world_size=config.nproc_per_node, entrypoint=self.plan.cmd,
            args=tuple(self.plan.cmd_args), rdzv_handler=rdzv_registry.get_rendezvous_handler(params),
            max_restarts=config.max_restarts, monitor_interval=config.monitor_interval,
            master_addr=master_addr, master_port=master_port, local_addr=config.local_addr,
        )
        agent_class = _torch_compat.hooked_agent_class(self.on_started, self.on_monitor, self.on_restart)
        self.agent = agent_class(spec=spec, logs_specs=config.logs_specs, start_method=config.start_method,
                                 log_line_prefix_template=config.log_line_prefix_template)
        return self.agent

    def _requeue(self) -> str:
        """Requeue the job unless it was cancelled or already requeued; says which, for the
        summary's exit line."""
        job = self.plan.detected.job_id
        # A preemption requeues; a user's cancel ends the job. Both reach the workers as a signal
        # (scancel sends TERM), but Slurm has already marked a cancelled job COMPLETING: only a
        # job still RUNNING (the time limit's USR1, scancel --signal=USR1 --batch) is requeued.
        job_info = slurm_job_info(str(job))
        state = job_info.get("JobState")
        restarts = job_info.get("Restarts", "")
        # An admin's `scontrol requeue` (or Slurm's own preemption) also arrives as TERM to a
        # COMPLETING job, but Slurm has already counted the restart: that job comes back.
        requeued = state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED") or (
            restarts.isdigit() and int(restarts) > self.plan.detected.restart_count)
        if state is not None and (state != "RUNNING" or requeued):
            why = ("already requeued (an admin's scontrol requeue, or Slurm's own preemption)" if requeued else
                   "cancelled (scancel) or ended by the scheduler: the save stands, the job ends")
            self.emit(Event.REQUEUE_SKIPPED, job_id=job, job_state=state, reason=f"job {job} is {state}: {why}")
            return (f"Slurm has requeued job {job} itself" if requeued else
                    "the job was cancelled, so it is not requeued")
        try:
            r = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True, timeout=60)
            ok = r.returncode == 0
            self.emit(Event.REQUEUED if ok else Event.REQUEUE_FAILED, job_id=job,
                      **({} if ok else {"error": (r.stderr or r.stdout).strip()}))
        except (OSError, subprocess.TimeoutExpired) as e:
            ok = False
            self.emit(Event.REQUEUE_FAILED, job_id=job, error=str(e))
        return f"job {job} requeued" if ok else f"requeueing job {job} failed (see requeue_failed): resubmit it"


def slurm_job_info(job: str) -> dict[str, str]:
    """The job's fields as slurmctld sees them now (``scontrol show job -o``: ``JobState``,
    ``Restarts``, ...); empty when it cannot be asked (then the launcher requeues, as before)."""
    try:
        r = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}


class _PreemptionIsNotAFailure(logging.Filter):
    """torch's agent logs every worker exit that is not 0 at ERROR (``failed (exitcode: 75)``).
    Exit 75 is a worker that saved for a preemption, as asked: drop that line (our own
    ``workers_preempted`` event and the summary say what happened); other codes pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("failed (exitcode: ") and args[:1] == (ExitCode.PREEMPTED,))


def main(argv: list[str]) -> int:
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_PreemptionIsNotAFailure())
    try:
        plan = plan_launch(argv)
    except ElasticResumeError as e:
        print(f"elastic-resume launch: {e}", file=sys.stderr)
        return ExitCode.USAGE
    return Launch(plan).run()


def doctor(argv: list[str]) -> int:
    """Print what was detected and what ``launch`` with these flags would do; start nothing.
    The script may be left out (``elastic-resume doctor --nproc-per-node 4``)."""
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)  # torchrun's OMP_NUM_THREADS banner
    try:
        plan = plan_launch(argv, check_script=False, script_optional=True)
    except ElasticResumeError as e:
        print(f"elastic-resume doctor: {e}", file=sys.stderr)
        return ExitCode.USAGE
    width = max(len(k) for k, _ in plan.describe())
    for key, value in plan.describe():
        print(f"{key:<{width}}  {value}")
    return 0
