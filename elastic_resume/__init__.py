"""elastic-resume: distributed PyTorch training that survives node failures, preemption and loss
spikes. The public API is this flat namespace.

Names that need torch are imported on first use (PEP 562), so the command line's listing and
verification start in a fraction of a second instead of paying for ``import torch``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
)
from .events import EventLog
from .preemption import EXIT_PREEMPTED

#: Exit code of a run that gave up (spike budget spent, nothing verifiable): do not retry.
EXIT_GAVE_UP = GaveUpError.exit_code

__version__ = "0.1.0"

_LAZY = {
    "CheckpointManager": "manager",
    "CheckpointStore": "store",
    "Manifest": "store",
    "ResumableDistributedSampler": "data",
    "RNGState": "state",
    "PerRank": "state",
    "SpikeGuard": "guard",
    "RollbackPolicy": "policy",
    "Threshold": "detectors",
    "MovingAverageRatio": "detectors",
    "EMARatio": "detectors",
    "RobustZScore": "detectors",
    "CUSUM": "detectors",
    "NonFinite": "detectors",
    "Plateau": "detectors",
    "settle_ddp_buckets": "ddp",
}

if TYPE_CHECKING:
    from .data import ResumableDistributedSampler
    from .ddp import settle_ddp_buckets
    from .detectors import CUSUM, EMARatio, MovingAverageRatio, NonFinite, Plateau, RobustZScore, Threshold
    from .guard import SpikeGuard
    from .policy import RollbackPolicy
    from .manager import CheckpointManager
    from .state import PerRank, RNGState
    from .store import CheckpointStore, Manifest


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'elastic_resume' has no attribute {name!r}")


__all__ = [
    "CUSUM",
    "EMARatio",
    "GaveUpError",
    "settle_ddp_buckets",
    "EXIT_PREEMPTED",
    "EXIT_GAVE_UP",
    "MovingAverageRatio",
    "NonFinite",
    "Plateau",
    "RobustZScore",
    "RollbackPolicy",
    "SpikeGuard",
    "Threshold",
    "CheckpointCorruptError",
    "CheckpointNotFoundError",
    "CheckpointManager",
    "CheckpointSaveError",
    "CheckpointStore",
    "CommitConflictError",
    "ConfigError",
    "DriftError",
    "ElasticResumeError",
    "EventLog",
    "Manifest",
    "NoCheckpointError",
    "PerRank",
    "RNGState",
    "ResumableDistributedSampler",
    "StateError",
    "StorageError",
    "UnsafeCheckpointError",
    "__version__",
]
