"""The contract with everything outside one process, defined once: exit codes, environment
variables, event names and default ports.

Users' scripts exit with these codes and Slurm batch scripts and Kubernetes manifests act on
them; the launcher passes settings to its workers through these variables; ``elastic-resume
report`` and people's own tooling read these event names from the JSONL logs. Every module that
writes or reads one of them imports it from here, so a name cannot drift between the writer and
the reader. The values are strings and ints underneath (``str``/``int`` enums), so they compare
equal to the literals found in logs, environments and manifests.
"""

from __future__ import annotations

import enum


class StrEnum(str, enum.Enum):
    """A string enum that prints and formats as its value (``enum.StrEnum`` needs Python 3.11)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class ExitCode(enum.IntEnum):
    """Exit status of ``elastic-resume`` commands, of the launcher and of its workers."""

    OK = 0
    #: A real failure (the launcher restarts workers that exit with it while restarts are left).
    FAILED = 1
    #: The CLI's negative answer: no checkpoint, or corruption found.
    NEGATIVE = 1
    #: A background save failed at interpreter exit: the last save was lost, so not a success.
    SAVE_FAILED = 1
    #: Bad usage: a flag, a root, a value; one line on stderr names it.
    USAGE = 2
    #: Preempted after a committed save: safe to requeue (EX_TEMPFAIL).
    PREEMPTED = 75
    #: Gave up (rollback budget spent, nothing verifiable to resume from): do not retry.
    GAVE_UP = 76
    #: An error no restart can heal (a bad root, option or flag, a state that does not match the
    #: model, drift with ``drift="fail"``): do not retry (EX_CONFIG).
    PERMANENT = 78


class Env(StrEnum):
    """Environment variables read by the library (``ER_*``) or set by the launcher for torch."""

    #: JSONL file the events of this process are appended to (the launcher sets it per node).
    EVENT_LOG = "ER_EVENT_LOG"
    #: Where each worker keeps its progress record for the launcher (elastic_resume.heartbeat).
    HEARTBEAT_DIR = "ER_HEARTBEAT_DIR"
    #: PID of the launcher; a worker whose parent is no longer this process exits.
    LAUNCHER_PID = "ER_LAUNCHER_PID"
    #: The rendezvous id of the run (for logs and reports).
    RUN_ID = "ER_RUN_ID"
    #: Resumes from one step without a newer commit before restore falls back (crash loops).
    MAX_RESUMES_PER_STEP = "ER_MAX_RESUMES_PER_STEP"
    #: Seconds the workers get to save after a preemption signal (``--er-grace``).
    GRACE_SECONDS = "ER_GRACE_SECONDS"
    HANG_TIMEOUT = "ER_HANG_TIMEOUT"
    #: ``auto``, ``always`` or ``never``: requeue the Slurm job after a preemption save.
    REQUEUE = "ER_REQUEUE"
    #: Number of nodes (pods) of a Kubernetes job; with ``MIN_NODES``, an elastic range.
    NNODES = "ER_NNODES"
    MIN_NODES = "ER_MIN_NODES"
    #: Port of the rendezvous store on node 0 (default :data:`DEFAULT_RDZV_PORT`).
    RDZV_PORT = "ER_RDZV_PORT"
    #: Kubernetes: the headless Service whose DNS names the pods (Indexed Job, JobSet).
    K8S_SERVICE = "ER_K8S_SERVICE"
    #: Kubernetes Indexed Job: the job's name when the pod's host name is not ``<job>-<index>``.
    JOB_NAME = "ER_JOB_NAME"
    #: Kubernetes Indexed Job: how many times the pod was retried (restart count).
    POD_RETRY = "ER_POD_RETRY"
    #: JobSet: pods per replicated job.
    PODS_PER_JOB = "ER_PODS_PER_JOB"
    #: ``1``: use torch internals outside the torch releases they were written for (see
    #: ``_torch_compat.SUPPORTED``) instead of refusing.
    ALLOW_UNSUPPORTED_TORCH = "ER_ALLOW_UNSUPPORTED_TORCH"
    #: Set for workers: without it, gloo restarts on torch 2.13 fail with "connectFullMesh".
    DISABLE_SHARE_RDZV_TCP_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


#: Port of the c10d rendezvous store on node 0 when nothing else names one.
DEFAULT_RDZV_PORT = 29400
#: Slurm: the rendezvous port of job J is SLURM_RDZV_PORT_BASE + J % SLURM_RDZV_PORT_SPAN (unless
#: ER_RDZV_PORT says), so two jobs sharing a node never share a rendezvous store; every node of
#: a job (and the generated batch script) derives the same one.
SLURM_RDZV_PORT_BASE = 30000
SLURM_RDZV_PORT_SPAN = 10000
#: torchrun's default master port (static rendezvous).
DEFAULT_MASTER_PORT = 29500
#: Resumes from one step, with nothing newer committed in between, before falling back.
DEFAULT_MAX_RESUMES_PER_STEP = 3
#: Seconds the workers get to save after a preemption signal.
DEFAULT_GRACE_SECONDS = 120


class Event(StrEnum):
    """Names of the structured events (one JSON object per line; ``event`` holds the name)."""

    # checkpoints: saving
    SAVE_STARTED = "save_started"
    SAVE_COMMITTED = "save_committed"
    SAVE_FAILED = "save_failed"
    CHECKPOINT_SUPERSEDED = "checkpoint_superseded"
    CHECKPOINT_MIGRATED = "checkpoint_migrated"
    # checkpoints: retention and removal
    CHECKPOINT_DELETED = "checkpoint_deleted"
    CHECKPOINT_RETIRED = "checkpoint_retired"
    INCOMPLETE_DELETED = "incomplete_deleted"
    PRUNE_FAILED = "prune_failed"
    # checkpoints: restoring
    RESTORED = "restored"
    RESTORE_NONE = "restore_none"
    RESTORE_FALLBACK = "restore_fallback"
    CORRUPTION_FOUND = "corruption_found"
    RESUME_CRASH_LOOP = "resume_crash_loop"
    DRIFT_FOUND = "drift_found"
    #: A restored state's own step counter disagrees with the step restored (see state.py).
    STEP_COUNTER_STALE = "step_counter_stale"
    PER_RANK_RESEEDED = "per_rank_reseeded"
    RNG_RESEEDED = "rng_reseeded"
    # the spike guard
    STEP = "step"
    #: The loss the guard judged for a step (the mean over the ranks), once the vote brought it
    #: (rank 0; a step or more after that step's own line).
    LOSS_JUDGED = "loss_judged"
    SPIKE_DETECTED = "spike_detected"
    SPIKE_IGNORED = "spike_ignored"
    VOTE_TRIGGERED = "vote_triggered"
    ROLLBACK_STARTED = "rollback_started"
    ROLLBACK_RESTORED = "rollback_restored"
    ROLLBACK = "rollback"
    #: A rollback decided before a crash, whose re-commit had not landed, carried out at start.
    ROLLBACK_RESUMED = "rollback_resumed"
    #: Such a rollback left alone: the run resumed from a step older than its anchor.
    ROLLBACK_ABANDONED = "rollback_abandoned"
    DATA_SKIPPED = "data_skipped"
    #: Steps trained again after a restart gave what they gave before, bit for bit (rank 0).
    REPLAY_VERIFIED = "replay_verified"
    #: A step trained again gave another loss or gradient norm than before (rank 0).
    REPLAY_MISMATCH = "replay_mismatch"
    #: Ranks that must hold bitwise-identical parameters (DDP replicas) do not; names the odd ranks.
    REPLICA_DIVERGENCE = "replica_divergence"
    #: A rank persistently slower than the others' mean (its busy time per step; rank, host, ratio).
    STRAGGLER_DETECTED = "straggler_detected"
    GAVE_UP = "gave_up"
    PREEMPTION_SAVE = "preemption_save"
    #: Under the launcher, a script saves but never checks the preemption flag (say so once).
    PREEMPTION_IGNORED = "preemption_ignored"
    # the launcher
    LAUNCH_STARTED = "launch_started"
    LAUNCH_FINISHED = "launch_finished"
    LAUNCH_ERROR = "launch_error"
    WORKERS_STARTED = "workers_started"
    WORKERS_FAILED = "workers_failed"
    #: The workers stopped with the preemption code after a committed save (not a failure).
    WORKERS_PREEMPTED = "workers_preempted"
    RESTART = "restart"
    PREEMPTION_REQUESTED = "preemption_requested"
    PREEMPTION_SIGNAL_REPEATED = "preemption_signal_repeated"
    PREEMPTION_GRACE_EXPIRED = "preemption_grace_expired"
    REQUEUED = "requeued"
    REQUEUE_FAILED = "requeue_failed"
    #: Not requeued on purpose: the job was cancelled (scancel), or the scheduler already ended or
    #: requeued it (an admin's scontrol requeue, Slurm's own preemption).
    REQUEUE_SKIPPED = "requeue_skipped"
    RENDEZVOUS_CLOSE_FAILED = "rendezvous_close_failed"
    #: The agent's loop has been blocked on the rendezvous store longer than the hang timeout (its
    #: host cut off): this node leaves the job, exit 1; the others go on if ``--nnodes`` allows.
    RENDEZVOUS_LOST = "rendezvous_lost"
    #: A worker made no progress for longer than the hang timeout (the launcher restarts the group).
    HANG_DETECTED = "hang_detected"
    #: This node leaves the job (its rank was a persistent straggler and exclusion is on); the
    #: other nodes' launchers restart without it.
    NODE_EXCLUDED = "node_excluded"


#: Events that say something went wrong: logged at WARNING (the rest at INFO).
WARNING_EVENTS = frozenset({
    Event.CORRUPTION_FOUND, Event.RESTORE_FALLBACK, Event.DRIFT_FOUND, Event.SAVE_FAILED, Event.PRUNE_FAILED,
    Event.RESUME_CRASH_LOOP, Event.WORKERS_FAILED, Event.PREEMPTION_GRACE_EXPIRED, Event.REQUEUE_FAILED,
    Event.LAUNCH_ERROR, Event.REPLAY_MISMATCH, Event.HANG_DETECTED, Event.REPLICA_DIVERGENCE,
    Event.STRAGGLER_DETECTED, Event.NODE_EXCLUDED, Event.RENDEZVOUS_LOST,
})
