"""What a training state is, and which parts of it belong to one rank.

A state is a dict ``name -> value``. By default a value is *replicated*: every rank holds the same
thing (a DDP model, its optimizer, the LR scheduler, counters, the resumable sampler's global
position), so it is written once in total, its bytes spread across ranks. A value is *per-rank*
when it differs between ranks: random number generator streams (``RNGState``), per-rank buffers
(wrap them in ``PerRank``). Per-rank values are written by their own rank.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import torch


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
                raise ValueError(
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
