"""Both spellings of Lightning, and every Lightning internal this integration touches.

Users write Lightning two ways, from two PyPI distributions:

- ``import pytorch_lightning as pl`` (``pytorch-lightning``; its Fabric is ``lightning_fabric``);
- ``import lightning.pytorch as pl`` (``lightning``; its Fabric is ``lightning.fabric``).

They are two copies of the same code with distinct classes: a ``pytorch_lightning.Trainer``
rejects a plugin derived from ``lightning.fabric``'s ``CheckpointIO`` ("Found invalid type for
plugin"), and the other way round. So the public classes derive from the base of *every*
namespace that is importable (:data:`CHECKPOINT_IO_BASES`, :data:`CALLBACK_BASES`): one
``ElasticCheckpointIO`` is accepted by whichever Trainer the user has, with either distribution
installed alone or both. Code that needs a namespace's classes at run time asks
:func:`namespace_of` for the one the trainer itself comes from.

The internals used (see ``callback.py``), all checked by the test suite over both namespaces and
over the oldest and newest supported releases (:data:`SUPPORTED`):

- ``loops.loop._Loop`` and its ``_restarting``/``_loaded_from_state_dict``/
  ``_resuming_from_checkpoint`` flags; ``fit_loop._combined_loader`` and
  ``_combined_loader_states_to_load``; ``fit_loop._data_fetcher`` and its ``fetched`` count
  (an in-process rollback continues the running loops from a loaded state);
- ``ModelCheckpoint._last_global_step_saved`` (a restored anchor is not saved again);
- ``trainer._checkpoint_connector._ckpt_path`` (what Lightning's "Restored all states from the
  checkpoint at ..." and ``trainer.ckpt_path`` name: after a fallback, the checkpoint loaded);
- the ``loss`` in ``on_train_batch_end``'s outputs is, under automatic optimization, the
  training step's loss divided by ``accumulate_grad_batches`` (``ClosureResult``'s
  ``normalize``): :func:`raw_loss` undoes it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, UnsupportedVersionError

#: The Lightning releases CI tests (both distributions): 2.5 is the oldest, 2.6 the newest.
SUPPORTED = ((2, 5), (2, 7))  # >= 2.5, < 2.7
SUPPORTED_TEXT = ">=2.5,<2.7"

# namespace -> (its pytorch package, its fabric package)
_PACKAGES = {"pytorch_lightning": ("pytorch_lightning", "lightning_fabric"),
             "lightning": ("lightning.pytorch", "lightning.fabric")}


@dataclass(frozen=True)
class Namespace:
    """One importable spelling of Lightning, with the classes this integration uses."""

    name: str  # "pytorch_lightning" or "lightning"
    version: str
    Callback: type
    CheckpointIO: type
    ModelCheckpoint: type
    Loop: type  # loops.loop._Loop (internal)


def _version_tuple(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


_UNSUPPORTED: list[str] = []  # "pytorch_lightning 1.9.5": importable but outside SUPPORTED


def _load(name: str) -> Namespace | None:
    pytorch_name, fabric_name = _PACKAGES[name]
    try:
        pl = importlib.import_module(pytorch_name)
    except ImportError:
        return None
    version = str(getattr(pl, "__version__", "0.0"))
    if not SUPPORTED[0] <= _version_tuple(version) < SUPPORTED[1]:
        _UNSUPPORTED.append(f"{pytorch_name} {version}")
        return None
    fabric = importlib.import_module(f"{fabric_name}.plugins")
    callbacks = importlib.import_module(f"{pytorch_name}.callbacks")
    loop = importlib.import_module(f"{pytorch_name}.loops.loop")
    return Namespace(name=name, version=version, Callback=callbacks.Callback,
                     CheckpointIO=fabric.CheckpointIO, ModelCheckpoint=callbacks.ModelCheckpoint,
                     Loop=loop._Loop)


NAMESPACES: dict[str, Namespace] = {n: ns for n in _PACKAGES if (ns := _load(n)) is not None}
if not NAMESPACES:
    raise UnsupportedVersionError(
        (f"elastic_resume.lightning supports Lightning {SUPPORTED_TEXT}, found {', '.join(_UNSUPPORTED)}; "
         if _UNSUPPORTED else "elastic_resume.lightning needs PyTorch Lightning; ")
        + "pip install 'elastic-resume[pytorch-lightning]' (import pytorch_lightning) "
        "or 'elastic-resume[lightning]' (import lightning.pytorch)"
    )

#: Bases of the public classes: the class of every importable namespace, so either Trainer accepts them.
CHECKPOINT_IO_BASES: tuple[type, ...] = tuple(ns.CheckpointIO for ns in NAMESPACES.values())
CALLBACK_BASES: tuple[type, ...] = tuple(ns.Callback for ns in NAMESPACES.values())
MODEL_CHECKPOINTS: tuple[type, ...] = tuple(ns.ModelCheckpoint for ns in NAMESPACES.values())


def namespace_of(trainer: Any) -> Namespace:
    """The namespace the trainer's own class comes from."""
    root = type(trainer).__module__.split(".")[0]
    ns = NAMESPACES.get(root)
    if ns is None:
        raise ConfigError(f"{type(trainer).__module__}.{type(trainer).__qualname__} is not a Lightning Trainer "
                          f"from {' or '.join(NAMESPACES)}")
    return ns


# -- the internals, one function each --------------------------------------------------------------
def continue_loops(trainer: Any) -> None:
    """After loading a checkpoint into a running trainer: a loaded loop marks itself (and its
    children) as restarting at its next run; these loops are running, so clear the marks."""
    loop_type = namespace_of(trainer).Loop
    stack = [trainer.fit_loop]
    while stack:
        loop = stack.pop()
        loop._restarting = False
        loop._loaded_from_state_dict = False
        loop._resuming_from_checkpoint = False
        stack += [v for v in vars(loop).values() if isinstance(v, loop_type)]


def load_dataloader_states(trainer: Any) -> None:
    """Apply the dataloader states the fit loop's ``load_state_dict`` put aside."""
    fit_loop = trainer.fit_loop
    if fit_loop._combined_loader is not None:
        fit_loop._combined_loader._load_state_dicts(fit_loop._combined_loader_states_to_load)
    fit_loop._combined_loader_states_to_load = []


def restart_data_fetcher(trainer: Any) -> None:
    """The next batch comes from the loader's (restored) position, as in a resumed epoch."""
    fit_loop = trainer.fit_loop
    fetcher = fit_loop._data_fetcher
    if fetcher is not None:
        iter(fetcher)
        fetcher.fetched += fit_loop.epoch_loop.batch_progress.current.ready


def mark_saved(trainer: Any) -> None:
    """Tell every ModelCheckpoint this step is saved, so it does not write it again as ``-v1``."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, MODEL_CHECKPOINTS):
            checkpointer: Any = callback
            checkpointer._last_global_step_saved = trainer.global_step


def raw_loss(trainer: Any, pl_module: Any, value: float) -> float:
    """The loss ``training_step`` returned, from the normalized one Lightning hands to
    ``on_train_batch_end`` (divided by ``accumulate_grad_batches`` for the backward pass)."""
    if pl_module.automatic_optimization:
        return value * trainer.accumulate_grad_batches
    return value


def set_restored_path(trainer: Any, path: str) -> None:
    """Make ``trainer.ckpt_path`` (and the log line Lightning writes at the end of its restore)
    name the checkpoint that was actually loaded."""
    trainer._checkpoint_connector._ckpt_path = path
