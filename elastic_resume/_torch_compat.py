"""Every touch of a torch internal, one function each, and the torch releases they were written for.

What ties elastic-resume to torch beyond its public API:

- the launcher subclasses torchrun's ``LocalElasticAgent`` and overrides its private hooks
  ``_start_workers``, ``_monitor_workers`` and ``_restart_workers``; it reads ``_pcontext`` (the
  worker PIDs, to forward a preemption signal), sets ``_remaining_restarts`` (no restart after
  "gave up" or a preemption) and closes ``_worker_group.spec.rdzv_handler`` like torchrun does;
  it uses ``torch.distributed.launcher.api._get_addr_and_port``, ``LaunchConfig.signals_to_handle``
  and the argument parser's ``_actions`` (``doctor`` makes the script optional);
- sharded (DTensor) restores give optimizers their state through
  ``torch.distributed.checkpoint.state_dict._init_optim_state``, as DCP's own helpers do;
- scaling the learning rate after a rollback keeps ``LRScheduler._last_lr`` truthful;
- aborting an NCCL group when the job is re-formed uses ``distributed_c10d._abort_process_group``
  where the installed torch has it (not exercised without a GPU).

:data:`SUPPORTED` is the range these were written for: CI runs torch 2.13, and each internal
above was read, unchanged, in the 2.14 sources. Outside the range the first use of an internal
fails with :class:`~elastic_resume.errors.UnsupportedVersionError` naming the range, instead of
an ``AttributeError`` deep inside a run (set ``ER_ALLOW_UNSUPPORTED_TORCH=1`` to try anyway).
Checkpoint saving and loading use only torch's public API and are not gated.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from .contract import Env
from .errors import UnsupportedVersionError

SUPPORTED = ((2, 13), (2, 15))  # >= 2.13, < 2.15
SUPPORTED_TEXT = ">=2.13,<2.15"


def _version_tuple(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


@functools.cache
def require(feature: str) -> None:
    """Fail clearly, once per feature, when this torch is outside :data:`SUPPORTED`."""
    version = str(torch.__version__)
    if SUPPORTED[0] <= _version_tuple(version) < SUPPORTED[1] or os.environ.get(Env.ALLOW_UNSUPPORTED_TORCH) == "1":
        return
    raise UnsupportedVersionError(
        f"{feature} relies on torch internals written for torch {SUPPORTED_TEXT}; this is torch {version}. "
        f"Install a torch in that range, or set {Env.ALLOW_UNSUPPORTED_TORCH}=1 to try anyway"
    )


def _missing(feature: str, what: str) -> UnsupportedVersionError:
    return UnsupportedVersionError(
        f"{feature}: torch {torch.__version__} has no {what} (elastic-resume supports torch {SUPPORTED_TEXT})"
    )


# -- torchrun's launcher and agent -----------------------------------------------------------------
def launcher_api() -> Any:
    """``torch.distributed.run`` and ``torch.distributed.launcher.api``, checked for the pieces the
    launcher uses."""
    require("elastic-resume launch")
    import torch.distributed.launcher.api as launcher_api
    import torch.distributed.run as run

    for module, name in ((run, "get_args_parser"), (run, "parse_min_max_nnodes"), (run, "config_from_args"),
                         (launcher_api, "_get_addr_and_port")):
        if not hasattr(module, name):
            raise _missing("elastic-resume launch", f"{module.__name__}.{name}")
    if "signals_to_handle" not in getattr(launcher_api.LaunchConfig, "__dataclass_fields__", {}):
        raise _missing("elastic-resume launch", "LaunchConfig.signals_to_handle")
    return run


def make_script_optional(parser: argparse.ArgumentParser, placeholder: str) -> None:
    """torchrun's parser requires the training script; ``doctor`` describes a launch without one."""
    for action in parser._actions:
        if action.dest == "training_script":
            action.nargs, action.default = "?", placeholder


def get_addr_and_port(params: Any) -> tuple[str | None, int | None]:
    from torch.distributed.launcher.api import _get_addr_and_port

    return _get_addr_and_port(params)


def hooked_agent_class(on_started: Callable[[Any, Any], None], on_monitor: Callable[[Any, Any], Any],
                       on_restart: Callable[[Any], None]) -> type:
    """torch's ``LocalElasticAgent``, telling the launcher about starts, failures and restarts
    through its private hooks. Each callback gets the agent first."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    for hook in ("_start_workers", "_monitor_workers", "_restart_workers"):
        if not callable(getattr(LocalElasticAgent, hook, None)):
            raise _missing("elastic-resume launch", f"LocalElasticAgent.{hook}")

    class ResumeAgent(LocalElasticAgent):
        def _start_workers(self, worker_group: Any) -> dict[int, Any]:
            pids = super()._start_workers(worker_group)
            on_started(self, worker_group)
            return pids

        def _monitor_workers(self, worker_group: Any) -> Any:
            return on_monitor(self, super()._monitor_workers(worker_group))

        def _restart_workers(self, worker_group: Any) -> None:
            on_restart(self)
            super()._restart_workers(worker_group)

    return ResumeAgent


def worker_pids(agent: Any) -> list[int]:
    """PIDs of the agent's running workers (none while it starts or restarts them)."""
    return list(local_worker_pids(agent).values())


def local_worker_pids(agent: Any) -> dict[int, int]:
    """Local rank -> PID of the agent's running workers."""
    pcontext = getattr(agent, "_pcontext", None)
    if pcontext is None:
        return {}
    try:
        return {int(rank): int(pid) for rank, pid in pcontext.pids().items() if pid}
    except Exception:  # noqa: BLE001 - a context half torn down during a restart
        return {}


def remaining_restarts(agent: Any) -> int:
    return int(agent._remaining_restarts)


def forbid_restarts(agent: Any) -> None:
    """The agent restarts no more workers (after "gave up" or a preemption)."""
    agent._remaining_restarts = 0


def close_rendezvous(agent: Any) -> None:
    """Close the run's rendezvous, as torchrun does when its agent ends."""
    agent._worker_group.spec.rdzv_handler.shutdown()


# -- process groups ----------------------------------------------------------------------------------
def abort_process_group(group: Any) -> bool:
    """Abort ``group``'s communicators (NCCL: in-flight collectives return instead of hanging);
    False when this torch has no abort, and the caller destroys the group instead."""
    import torch.distributed as dist

    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None:
        return False
    abort(group)
    return True


# -- checkpoints -------------------------------------------------------------------------------------
def dcp_exception() -> type[BaseException]:
    """torch.distributed.checkpoint's CheckpointException (it derives from BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create an optimizer's state tensors before an in-place (DCP) load, as DCP's helpers do."""
    require("restoring sharded optimizer state")
    from torch.distributed.checkpoint import state_dict

    init = getattr(state_dict, "_init_optim_state", None)
    if init is None:
        raise _missing("restoring sharded optimizer state", "torch.distributed.checkpoint.state_dict._init_optim_state")
    init(optimizer)


def set_last_lr(scheduler: torch.optim.lr_scheduler.LRScheduler, lrs: list[Any]) -> None:
    """What ``get_last_lr()`` returns, after the guard scaled the learning rate."""
    scheduler._last_lr = lrs
