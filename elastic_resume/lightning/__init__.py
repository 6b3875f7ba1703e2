"""PyTorch Lightning integration (the ``lightning`` extra).

Three pieces, each in Lightning's own idiom::

    from elastic_resume.lightning import ElasticCheckpointIO, ElasticResume, ResumableDataLoader

    ckpt_io = ElasticCheckpointIO(async_save=True)           # atomic, verified, local or s3://
    trainer = L.Trainer(
        strategy="ddp", use_distributed_sampler=False,
        plugins=[ckpt_io],
        callbacks=[ModelCheckpoint(dirpath=ROOT, every_n_train_steps=50, save_top_k=-1),
                   ElasticResume(policy=RollbackPolicy(margin=100, skip_after=200))],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_io.resume_path(ROOT))
    sys.exit(trainer.callbacks[...].exit_code)                # 75 after a preemption save

- ``ElasticCheckpointIO`` (``checkpoint_io.py``): every Lightning checkpoint path becomes a
  small checkpoint store of its own, committed by a manifest, every byte verified on load; the
  newest checkpoint every rank can load is found and agreed at load time.
- ``ElasticResume`` (``callback.py``): the spike detectors and the one-collective vote in the
  training loop, in-process rollback through Lightning's own state (no second ``fit``), data
  skipping, LR scaling, preemption saves, and the drift report on resume.
- ``ResumableDataLoader`` (from ``elastic_resume.training``, re-exported here): a drop-in
  ``DataLoader`` over ``ResumableDistributedSampler`` whose position Lightning saves in its loop
  state, so a mid-epoch resume continues with the next batch.

Behind them: ``backend.py`` (the spike guard's checkpoint backend inside a ``Trainer``),
``loading.py`` (``load_from_checkpoint`` and export), ``_compat.py`` (both namespaces and every
Lightning internal used). Saving, reading and agreeing go through the checkpoint engine
(``elastic_resume.checkpoint``), the same one ``CheckpointManager`` uses.
"""

from __future__ import annotations

from ..training.loader import ResumableDataLoader
from . import _compat  # noqa: F401 - fails here, with the remedy, when no supported Lightning is importable
from .callback import ElasticResume
from .checkpoint_io import CHECKPOINT_KEY, ElasticCheckpointIO
from .loading import load_checkpoint, load_from_checkpoint

__all__ = ["CHECKPOINT_KEY", "ElasticCheckpointIO", "ElasticResume", "ResumableDataLoader", "load_checkpoint",
           "load_from_checkpoint"]
