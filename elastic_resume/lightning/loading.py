"""Loading a trained model the Lightning way, in any process, with every byte verified.

What ``ElasticCheckpointIO`` saves at a ``ModelCheckpoint`` path is one file that
``MyModel.load_from_checkpoint(path)`` and ``torch.load(path, weights_only=True)`` open directly
(unverified: they skip its integrity record). These verify it first, and also read the bundle
directories earlier releases wrote:

- ``load_checkpoint(path)``: the Lightning checkpoint dict, verified (a file against its record,
  a bundle against its manifest). One process, any rank, no collective; local paths and object
  stores.
- ``load_from_checkpoint(MyModel, path)``: that dict handed to Lightning's own
  ``MyModel.load_from_checkpoint``, so hyper-parameters, ``strict``, ``map_location`` and
  ``**kwargs`` behave as there. Lightning reads it with ``torch.load(weights_only=True)``: only
  tensors, containers, stdlib value types and the user's ``allowed_classes`` (an enum member, a
  dataclass in the hyper-parameters, rebuilt from the file's typed copy) are in it, so nothing a
  file chose is constructed.
- ``elastic-resume export PATH OUT.ckpt`` (or ``.safetensors``): the weights as a new file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import inspect
import io
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import torch

from ..checkpoint.export import to_bytes
from ..checkpoint.values import allowed_class_names, allowed_classes_present, is_omegaconf, plain
from ..collectives import LocalGroup
from .checkpoint_io import ElasticCheckpointIO


def load_checkpoint(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
                    allowed_classes: Iterable[str | type] = ()) -> dict[str, Any]:
    """The Lightning checkpoint dict at ``path`` (a single file, or a bundle's newest committed
    step), verified; in this process alone. A plain ``.ckpt`` file is read as Lightning's default would.
    ``allowed_classes``: as for ``ElasticCheckpointIO``."""
    plugin = ElasticCheckpointIO(storage_options=storage_options, group=LocalGroup(), allowed_classes=allowed_classes)
    return plugin.load_checkpoint(path)


#: Value types the weights-only unpickler may build for Lightning (stdlib values with no code of
#: their own), beside the classes the user allowlisted.
_SAFE_VALUE_TYPES: tuple[type, ...] = (
    pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath, frozenset,
    dt.datetime, dt.date, dt.time, dt.timedelta, dt.timezone, argparse.Namespace,
)


def _weights_only_tree(value: Any, allowed: frozenset[type]) -> Any:
    """``value`` with what the weights-only unpickler may build kept as it is (containers,
    stdlib value types, the user's allowlisted classes) and everything else in plain form
    (``values.plain``: an OmegaConf config as a dict, an enum as its value, ...)."""
    kind = type(value)
    if kind is dict:
        return {k: _weights_only_tree(v, allowed) for k, v in value.items()}
    if kind in (list, tuple, set, frozenset):
        return kind(_weights_only_tree(v, allowed) for v in value)
    if kind is argparse.Namespace:
        return argparse.Namespace(**{k: _weights_only_tree(v, allowed) for k, v in vars(value).items()})
    if kind in _SAFE_VALUE_TYPES or kind in allowed:
        return value
    if is_omegaconf(value):  # resolver calls were made literal when decoded: only its own nodes resolve
        from omegaconf import OmegaConf

        with contextlib.suppress(Exception):  # a reference to a missing node: kept as text below
            return _weights_only_tree(OmegaConf.to_container(value, resolve=True), allowed)
    return plain(value)


def load_from_checkpoint(cls: Any, path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
                         allowed_classes: Iterable[str | type] = (), **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path, **kwargs)``, verified first (``cls``: a LightningModule or
    LightningDataModule class of either namespace). Lightning reads it with
    ``torch.load(weights_only=True)``: it gets tensors, plain containers, stdlib value types
    and the ``allowed_classes`` (enum members and dataclasses); OmegaConf configs and other
    classes arrive in plain form (a config as a dict, which Lightning wraps in an AttributeDict)."""
    checkpoint = load_checkpoint(path, storage_options=storage_options, allowed_classes=allowed_classes)
    allowed = frozenset(allowed_classes_present(allowed_class_names(allowed_classes)))
    data = to_bytes(_weights_only_tree(checkpoint, allowed))
    if "weights_only" in inspect.signature(cls.load_from_checkpoint).parameters:
        kwargs.setdefault("weights_only", True)
    with torch.serialization.safe_globals([*_SAFE_VALUE_TYPES, *allowed]):
        return cls.load_from_checkpoint(io.BytesIO(data), **kwargs)

