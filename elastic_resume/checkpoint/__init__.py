"""Checkpoints: what one is, how ranks write it, agree on one and load it.

- ``manager.py``   ``CheckpointManager`` and its ``CheckpointOptions``: the facade a training loop uses
- ``saving.py``    the writer: snapshot, who writes which tensor, staging, the collective write, the commit
- ``staging.py``   host buffers for background saves (only what this rank writes)
- ``reading.py``   the reader: one rank's verified share of a step
- ``agreement.py`` where ranks agree on which checkpoint to load
- ``store.py``     one root's steps: listing, reading and verifying files, commit, retire
- ``layout.py``    names on disk; ``manifest.py`` the commit marker; ``format.py`` the data files;
  ``values.py`` config values inside them
- ``retention.py`` what to keep (pure) and pruning; ``crash_loop.py`` falling back from a step
  that keeps crashing
- ``state.py``     what a training state is (replicated, per-rank, RNG streams)
- ``sharded.py``   DTensor state through torch.distributed.checkpoint
- ``fingerprint.py`` and ``drift.py``: what a run is, and what changed since the checkpoint
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported on first use: listing and verifying (the CLI) need store.py, not torch.
_LAZY = {"CheckpointManager": "manager", "CheckpointOptions": "manager", "CheckpointStore": "store",
         "Manifest": "manifest"}

if TYPE_CHECKING:
    from .manager import CheckpointManager, CheckpointOptions
    from .manifest import Manifest
    from .store import CheckpointStore


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CheckpointManager", "CheckpointOptions", "CheckpointStore", "Manifest"]
