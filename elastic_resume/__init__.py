"""elastic-resume: distributed PyTorch training that survives node failures, preemption and loss
spikes. The public API is this flat namespace, whatever the package layout behind it:

- ``storage/``    where bytes are written and read (local disk, S3, GCS, Azure, memory)
- ``checkpoint/`` what a checkpoint is; how ranks write it, agree on one and load it
- ``spike/``      loss-spike detectors, the per-step vote, the rollback policy, the guard
- ``training/``   what a training loop holds to resume exactly (resumable sampler, DDP settling)
- ``launcher/``   ``elastic-resume launch``: torchrun's agent, platform detection, Slurm, the worker
- ``lightning/``  the PyTorch Lightning plugin and callback (optional)
- ``contract.py`` exit codes, environment variables, event names, default ports
- ``errors.py``, ``events.py``, ``collectives.py``, ``preemption.py``, ``report.py``, ``cli.py``,
  ``_torch_compat.py`` (every torch internal used)

Names that need torch are imported on first use (PEP 562), so the command line's listing and
verification start in a fraction of a second instead of paying for ``import torch``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .contract import Event, ExitCode
from .errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CommitConflictError,
    ConfigError,
    DriftError,
    ElasticResumeError,
    GaveUpError,
    NoCheckpointError,
    StateError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedVersionError,
)
from .events import EventLog

#: Exit code after a committed preemption save: safe to requeue.
EXIT_PREEMPTED = ExitCode.PREEMPTED
#: Exit code of a run that gave up (spike budget spent, nothing verifiable): do not retry.
EXIT_GAVE_UP = ExitCode.GAVE_UP

__version__ = "0.8.0"  # tests/test_codebase.py holds it to pyproject.toml

_LAZY = {
    "CheckpointManager": "checkpoint.manager",
    "CheckpointOptions": "checkpoint.manager",
    "CheckpointStore": "checkpoint.store",
    "Manifest": "checkpoint.manifest",
    "RNGState": "checkpoint.state",
    "PerRank": "checkpoint.state",
    "ResumableDataLoader": "training.loader",
    "ResumableDistributedSampler": "training.sampler",
    "settle_ddp_buckets": "training.ddp",
    "SpikeGuard": "spike.guard",
    "GuardOptions": "spike.guard",
    "CheckpointBackend": "spike.backend",
    "RollbackPolicy": "spike.policy",
    "Threshold": "spike.detectors",
    "MaxRatio": "spike.detectors",
    "MovingAverageRatio": "spike.detectors",
    "EMARatio": "spike.detectors",
    "RobustZScore": "spike.detectors",
    "CUSUM": "spike.detectors",
    "NonFinite": "spike.detectors",
    "Plateau": "spike.detectors",
    "default_detectors": "spike.detectors",
}

if TYPE_CHECKING:
    from .checkpoint.manager import CheckpointManager, CheckpointOptions
    from .checkpoint.manifest import Manifest
    from .checkpoint.state import PerRank, RNGState
    from .checkpoint.store import CheckpointStore
    from .spike.backend import CheckpointBackend
    from .spike.detectors import (
        CUSUM,
        EMARatio,
        MaxRatio,
        MovingAverageRatio,
        NonFinite,
        Plateau,
        RobustZScore,
        Threshold,
        default_detectors,
    )
    from .spike.guard import GuardOptions, SpikeGuard
    from .spike.policy import RollbackPolicy
    from .training.ddp import settle_ddp_buckets
    from .training.loader import ResumableDataLoader
    from .training.sampler import ResumableDistributedSampler

    def _manager_is_a_backend(manager: CheckpointManager) -> CheckpointBackend:
        """The type checker proves CheckpointManager fulfils the guard's backend protocol."""
        return manager


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'elastic_resume' has no attribute {name!r}")


__all__ = [
    "CUSUM",
    "EXIT_GAVE_UP",
    "EXIT_PREEMPTED",
    "CheckpointBackend",
    "CheckpointCorruptError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointOptions",
    "CheckpointSaveError",
    "CheckpointStore",
    "CommitConflictError",
    "ConfigError",
    "DriftError",
    "EMARatio",
    "ElasticResumeError",
    "Event",
    "EventLog",
    "ExitCode",
    "GaveUpError",
    "GuardOptions",
    "Manifest",
    "MaxRatio",
    "MovingAverageRatio",
    "NoCheckpointError",
    "NonFinite",
    "PerRank",
    "Plateau",
    "RNGState",
    "ResumableDataLoader",
    "ResumableDistributedSampler",
    "RobustZScore",
    "RollbackPolicy",
    "SpikeGuard",
    "StateError",
    "StorageError",
    "Threshold",
    "UnsafeCheckpointError",
    "UnsupportedVersionError",
    "__version__",
    "default_detectors",
    "settle_ddp_buckets",
]
