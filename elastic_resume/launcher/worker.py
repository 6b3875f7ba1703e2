"""``python -m elastic_resume.launcher.worker SCRIPT ARGS`` (or ``-m MODULE ARGS``): what the launcher runs
in each worker process before the training script.

It does three things, then runs the script exactly as ``python SCRIPT`` would (same
``sys.argv``, ``sys.path[0]`` and ``__main__``):

* asks the kernel to SIGKILL this worker when the launcher dies (``PR_SET_PDEATHSIG``), so a
  SIGKILLed launcher leaves no orphan holding GPUs or ports; a restarted launcher then resumes
  from the last verified checkpoint;
* installs the preemption handlers (:mod:`elastic_resume.preemption`) at once, so a signal that
  arrives while the script is still importing is not lost;
* checks that the launcher is still its parent (it may have died before the prctl).

And on the way out it keeps the exit-code contract without ceremony in the script: a
:class:`~elastic_resume.errors.GaveUpError` that escapes the script (from a plain loop or from
Lightning's ``fit``) exits 76, "do not retry", with its one-line reason; and a process group the
script left initialised is destroyed before interpreter teardown, where gloo's threads abort the
process (SIGABRT) about one time in three with torch 2.13 (measured: 4-6 of 12 two-rank runs), and
the launcher would take that abort for a crash and restart a run that finished or gave up.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import runpy
import signal
import sys

from .. import preemption
from ..contract import Env, ExitCode
from ..errors import GaveUpError

_PR_SET_PDEATHSIG = 1


def _die_with_launcher() -> None:
    launcher = os.environ.get(Env.LAUNCHER_PID)
    if not launcher or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # it died before the prctl took effect
        os._exit(ExitCode.FAILED)


def main(argv: list[str]) -> None:
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        sys.stderr.write("usage: python -m elastic_resume.launcher.worker SCRIPT [ARGS] | -m MODULE [ARGS]\n")
        raise SystemExit(ExitCode.USAGE)
    _die_with_launcher()
    preemption.install()
    # Registered before the script runs, so it runs after the script's own exit handlers.
    atexit.register(_destroy_process_group)
    try:
        _run(argv)
    except GaveUpError as e:
        sys.stderr.write(f"elastic-resume: gave up: {e}\n")
        raise SystemExit(int(ExitCode.GAVE_UP)) from None


def _destroy_process_group() -> None:
    dist = sys.modules.get("torch.distributed")  # never import torch just to leave
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving anyway; the exit code is what matters
        pass


def _run(argv: list[str]) -> None:
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        script = argv[0]
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
