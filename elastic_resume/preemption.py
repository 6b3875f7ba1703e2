"""Worker side of preemption: a signal becomes a flag that the spike vote carries.

The launcher forwards SIGUSR1 to its workers when it is told to stop (SIGUSR1 from Slurm's
``--signal``, SIGTERM from Kubernetes or ``scancel``); under Slurm the workers may get the signal
directly too. A handler cannot save a checkpoint (it runs between two bytecodes of whatever the
main thread was doing, possibly half-way through a collective), so it only sets a flag.
``SpikeGuard.step`` puts the flag into its one per-step collective; every rank sees the sum, so
all ranks save the same step, and the script exits with code 75.

Only a process that will look at the flag should swallow SIGTERM: until a consumer (the guard, or
the Lightning callback) registers, SIGTERM keeps its default meaning and terminates the process.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from .contract import ExitCode

#: Signals that ask for a save-and-exit rather than an immediate death.
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
#: Exit code of a worker (and of the launcher) after a committed preemption save.
EXIT_PREEMPTED = ExitCode.PREEMPTED

_lock = threading.Lock()
_requested: dict[str, Any] | None = None
_consumers = 0
_installed = False


def _handler(signum: int, frame: Any) -> None:
    global _requested
    if _requested is None:
        _requested = {"signal": signal.Signals(signum).name, "at": time.time()}
    if signum == signal.SIGTERM and _consumers == 0:
        # Nobody will act on the flag: keep SIGTERM's usual meaning.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def install() -> bool:
    """Turn SIGUSR1/SIGTERM into a preemption request (main thread only; idempotent).
    Returns False where signals cannot be installed (not the main thread)."""
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, _handler)
    _installed = True
    return True


def register_consumer() -> None:
    """Declare that this process checks :func:`requested` at step boundaries, and install the
    handlers if the launcher's worker wrapper has not already."""
    global _consumers
    with _lock:
        _consumers += 1
    install()


def has_consumer() -> bool:
    """Whether anything in this process checks the flag (the guard, the Lightning callback,
    ``CheckpointManager.save_if_preempted``)."""
    return _consumers > 0


def unregister_consumer() -> None:
    global _consumers
    with _lock:
        _consumers = max(0, _consumers - 1)


def requested() -> dict[str, Any] | None:
    """``{"signal": "SIGUSR1", "at": ts}`` once a preemption signal arrived, else None."""
    return _requested


def request(reason: str = "api") -> None:
    """Ask for a preemption save from code (tests, custom schedulers' hooks)."""
    global _requested
    if _requested is None:
        _requested = {"signal": reason, "at": time.time()}


def clear() -> None:
    """Forget the request once it has been acted on."""
    global _requested
    _requested = None
