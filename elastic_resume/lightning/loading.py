"""Loading a trained model from a bundle the Lightning way, in any process.

A ``ModelCheckpoint`` path written through ``ElasticCheckpointIO`` (``best_model_path``,
``last.ckpt``) is a directory, so ``MyModel.load_from_checkpoint(path)`` and ``torch.load(path)``
cannot open it. Two ways instead:

- ``load_from_checkpoint(MyModel, path)``: the bundle verified (every byte against its manifest)
  and handed to Lightning's own ``MyModel.load_from_checkpoint``, so hyper-parameters, ``strict``,
  ``map_location`` and ``**kwargs`` behave as there. One process, any rank, no collective; local
  paths and ``s3://``.
- ``elastic-resume export --format lightning BUNDLE OUT.ckpt``: a standard ``.ckpt`` file that
  Lightning's ``load_from_checkpoint`` and ``torch.load(weights_only=True)`` read anywhere. Its
  hyper-parameters are plain (a path as text, an enum as its value, a config as a dict: see
  ``values.plain``), since ``weights_only=True`` refuses every other class.
"""

from __future__ import annotations

import inspect
import io
import os
from typing import Any

import torch

from ..checkpoint.values import plain
from ..collectives import LocalGroup
from ..errors import ConfigError
from .checkpoint_io import ElasticCheckpointIO


def load_checkpoint(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Lightning checkpoint dict a bundle holds (its newest committed step), verified; in
    this process alone. A plain ``.ckpt`` file is read as Lightning's default would."""
    plugin = ElasticCheckpointIO(storage_options=storage_options, group=LocalGroup())
    return plugin.load_checkpoint(path)


def to_bytes(checkpoint: dict[str, Any]) -> bytes:
    """``checkpoint`` as a standard ``.ckpt`` (what ``torch.save`` writes)."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def exportable(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with every config value in the plain form ``weights_only=True`` reads."""
    return plain(checkpoint)


def check_weights_only(data: bytes) -> None:
    """Refuse a ``.ckpt`` that ``torch.load(weights_only=True)`` would not read back (our decoder
    yields tensors and plain containers only, so every bundle passes; an export proves it)."""
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler's refusal, as one line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(e).__name__)
        raise ConfigError(f"checkpoint does not load with weights_only=True: {why[:300]}") from None


def load_from_checkpoint(cls: Any, path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
                         **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path, **kwargs)`` for a bundle (``cls``: a LightningModule or
    LightningDataModule class of either namespace)."""
    data = to_bytes(load_checkpoint(path, storage_options=storage_options))
    if "weights_only" not in kwargs and "weights_only" in inspect.signature(cls.load_from_checkpoint).parameters:
        # These bytes were pickled a moment ago, in this process, from values decoded without
        # pickle: unpickling them runs nothing a file chose. The full unpickler gives the
        # hyper-parameters back with their types (paths, enums, OmegaConf configs, ...).
        kwargs["weights_only"] = False
    return cls.load_from_checkpoint(io.BytesIO(data), **kwargs)
