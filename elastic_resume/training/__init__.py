"""What a training loop holds so that a resume continues exactly where it stopped: the data
position (``sampler.py``: a distributed sampler that checkpoints its global position and skips
windows after a rollback; ``loader.py``: the ``DataLoader`` over it that counts batches where
training takes them) and DDP's gradient-bucket order (``ddp.py``)."""

from __future__ import annotations

from .ddp import settle_ddp_buckets
from .loader import ResumableDataLoader
from .sampler import ResumableDistributedSampler

__all__ = ["ResumableDataLoader", "ResumableDistributedSampler", "settle_ddp_buckets"]
