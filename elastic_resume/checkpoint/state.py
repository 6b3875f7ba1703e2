"""What a training state is, which parts of it belong to one rank, and how a state is taken from
live objects and put back into them.

A state is a dict ``name -> value``. By default a value is *replicated*: every rank holds the same
thing (a DDP model, its optimizer, the LR scheduler, counters, the resumable sampler's global
position), so it is written once in total, its bytes spread across ranks. A value is *per-rank*
when it differs between ranks: random number generator streams (``RNGState``), per-rank buffers
(wrap them in ``PerRank``). Per-rank values are written by their own rank.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from ..errors import StateError


class PerRank:
    """Marks a value as different on every rank. Plain values are restored into ``.value``;
    objects with ``load_state_dict`` are restored in place."""

    checkpoint_per_rank = True

    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> Any:
        v = self.value
        return v.state_dict() if callable(getattr(v, "state_dict", None)) else v

    def load_state_dict(self, state: Any) -> None:
        if callable(getattr(self.value, "load_state_dict", None)):
            self.value.load_state_dict(state)
        else:
            self.value = state


def is_per_rank(value: Any) -> bool:
    return bool(getattr(value, "checkpoint_per_rank", False))


class RNGState:
    """Every random stream of this process: Python's ``random``, NumPy's global generator,
    torch's CPU generator and, when present, each CUDA device's. Restoring it makes dropout,
    augmentation and shuffling continue exactly where they were.

    On a resume at a different world size there is no saved stream for new ranks, and reusing
    another rank's would correlate them; every rank is then reseeded from (saved seed material,
    rank), which is deterministic and reported by the manager."""

    checkpoint_per_rank = True
    reshardable = True

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        try:
            import numpy as np

            out["numpy"] = np.random.get_state()
        except ImportError:
            pass
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = [t for t in torch.cuda.get_rng_state_all()]
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(_as_python_rng_state(state["python"]))
        # Loaded tensors are views into one read buffer; the RNG setters read the raw storage
        # and need a tensor of their own (a view crashes set_rng_state).
        torch.set_rng_state(state["torch"].clone())
        if "numpy" in state:
            import numpy as np

            np.random.set_state(state["numpy"])
        if "cuda" in state and torch.cuda.is_available():
            saved = state["cuda"]
            if len(saved) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([t.clone() for t in saved])
            else:
                raise StateError(
                    f"checkpoint has CUDA RNG state for {len(saved)} devices, this process sees "
                    f"{torch.cuda.device_count()}"
                )

    def reshard(self, saved_any_rank: dict[str, Any], rank: int, world_size: int) -> None:
        """Derive a fresh, deterministic stream for ``rank`` after a world-size change."""
        material = bytes(saved_any_rank["torch"].numpy().tobytes()) + f"/{rank}/{world_size}".encode()
        seed = int.from_bytes(hashlib.sha256(material).digest()[:8], "little")
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % (2**32))
        except ImportError:
            pass


def _as_python_rng_state(state: Any) -> tuple[Any, ...]:
    # random.setstate needs (version, tuple_of_ints, gauss) with an inner tuple.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _has_state_dict(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def snapshot_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(replicated, per_rank) plain trees: ``state_dict()`` of stateful objects, other values as
    they are."""
    if not isinstance(state, Mapping):
        raise StateError(f"state must be a dict of name -> value, got {type(state).__name__}")
    replicated: dict[str, Any] = {}
    per_rank: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise StateError(f"state keys must be strings, got {key!r}")
        target = per_rank if is_per_rank(value) else replicated
        target[key] = value.state_dict() if _has_state_dict(value) else value
    return replicated, per_rank


def apply_state(state: MutableMapping[str, Any], loaded: Mapping[str, Any], *, step: int) -> None:
    """Restore in place: ``load_state_dict`` on stateful objects, refill plain dicts and lists,
    replace other plain values."""
    missing = [k for k in state if k not in loaded]
    if missing:
        raise StateError(
            f"checkpoint step {step} has no entry for {', '.join(map(repr, missing))} "
            f"(it holds {', '.join(map(repr, loaded)) or 'nothing'}); the state passed to restore() "
            "must use the same keys as the state that was saved"
        )
    # All or nothing as far as it can be known in advance: every module's and optimizer's
    # saved state is checked against the live object before anything is loaded, so a mismatch
    # leaves the live state untouched; plain values are replaced only after every load worked.
    for key in state:
        problem = _mismatch(state[key], loaded[key])
        if problem:
            raise StateError(f"checkpoint step {step}: cannot load state[{key!r}]: {problem}; nothing was loaded")
    for key in list(state):
        value = state[key]
        if _has_state_dict(value):
            try:
                value.load_state_dict(loaded[key])
            except Exception as e:
                raise StateError(f"checkpoint step {step}: cannot load state[{key!r}]: {e}") from e
    for key in list(state):
        value, saved = state[key], loaded[key]
        if _has_state_dict(value):
            continue
        # Containers are refilled in place, as load_state_dict does: a script that keeps a
        # reference (self.progress = state["progress"]) sees the restored counters.
        if type(value) is dict and isinstance(saved, Mapping):
            value.clear()
            value.update(saved)
        elif type(value) is list and isinstance(saved, list):
            value[:] = saved
        else:
            state[key] = saved


def stale_step_counters(state: Mapping[str, Any], step: int) -> list[tuple[str, int]]:
    """The script's own step counters in a restored ``state`` that disagree with the step it was
    saved as: ``state["step"]``, or a ``"step"`` entry of a dict in it (``state["progress"]["step"]``).
    A counter updated only on periodic saves holds an old value in a preemption save, and a loop
    that continues from it trains those steps again on top of the newer model."""
    found: list[tuple[str, int]] = []
    for key, value in state.items():
        candidates = [(f"state[{key!r}]", value)] if key == "step" else (
            [(f"state[{key!r}]['step']", value.get("step"))] if isinstance(value, dict) else [])
        for name, v in candidates:
            if isinstance(v, int) and not isinstance(v, bool) and v != step:
                found.append((name, v))
    return found


def _mismatch(live: Any, saved: Any) -> str | None:
    """Why ``saved`` cannot be loaded into ``live`` (a module or an optimizer), or None."""
    if isinstance(live, torch.nn.Module):
        if not isinstance(saved, Mapping):
            return f"the checkpoint holds {type(saved).__name__}, not a module state dict"
        own = live.state_dict()
        missing = [k for k in own if k not in saved]
        unexpected = [k for k in saved if k not in own]
        if missing or unexpected:
            return (f"missing keys {missing[:5]}" if missing else "") + (", " if missing and unexpected else "") + (
                f"unexpected keys {unexpected[:5]}" if unexpected else "")
        for k, t in own.items():
            v = saved[k]
            if isinstance(t, torch.Tensor) and isinstance(v, torch.Tensor) and t.shape != v.shape:
                return f"{k} has shape {tuple(v.shape)} in the checkpoint, {tuple(t.shape)} in the model"
    elif isinstance(live, torch.optim.Optimizer):
        groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
        if not isinstance(groups, list) or not isinstance(saved.get("state"), Mapping):
            return "the checkpoint holds no optimizer state dict"
        if len(groups) != len(live.param_groups) or any(
                not isinstance(g, Mapping) or len(g.get("params", ())) != len(lg["params"])
                for g, lg in zip(groups, live.param_groups)):
            return "the optimizer's parameter groups differ in number or size from the checkpoint's"
    return None
