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
Lightning's ``fit``) exits 76, "do not retry", with its one-line reason; an error no restart can
heal (a bad root, option or state: ``ElasticResumeError.permanent``) exits 78 likewise; a process group the
script left initialised is destroyed before interpreter teardown; and **a script that finished
exits 0, whatever torch's destructors do**. With torch 2.13, gloo's threads abort the process
(SIGABRT, "terminate called without an active exception") in the C++ destructors that run at
process exit, even after the script's own ``destroy_process_group()`` (1 of 6 two-rank runs here,
4 of 6 in another report): the launcher took that for a crash and trained a finished job again.
Once the script has returned (or called ``sys.exit(n)``: a preemption's 75, a 76), the
interpreter's own shutdown runs as usual (threads joined, every exit handler, an async save's
wait among them: a failed one still exits 1), and the last exit handler then flushes the streams
and leaves with that status through ``os._exit``, before the C++ destructors.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import faulthandler
import logging
import os
import runpy
import signal
import sys

from .. import preemption
from ..contract import Env, ExitCode
from ..errors import ElasticResumeError, GaveUpError, RegroupError

_PR_SET_PDEATHSIG = 1
#: First argument for a program that is not a Python script (``launch --no-python``): set the
#: death signal, then exec it.
EXEC = "--exec"


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
    if not argv or (argv[0] in ("-m", EXEC) and len(argv) < 2):
        sys.stderr.write("usage: python -m elastic_resume.launcher.worker SCRIPT [ARGS] | -m MODULE [ARGS] "
                         f"| {EXEC} PROGRAM [ARGS]\n")
        raise SystemExit(ExitCode.USAGE)
    _die_with_launcher()
    if argv[0] == EXEC:
        # --no-python: the worker is another program. It keeps the death signal across exec
        # (the kernel clears it only for set-user-ID programs), so a SIGKILLed launcher leaves
        # no orphan either; what it does with signals and exit codes is its own business.
        try:
            os.execvp(argv[1], argv[1:])
        except OSError as e:
            sys.stderr.write(f"elastic-resume: cannot run {argv[1]!r}: {e.strerror or e}\n")
            os._exit(ExitCode.PERMANENT if e.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC) else ExitCode.FAILED)
    preemption.install()
    _stacks_on_request()
    # Registered before the script runs, so they run after the script's own exit handlers (and
    # _leave_if_finished after every handler registered from here on).
    atexit.register(_leave_if_finished)
    atexit.register(_destroy_process_group)
    try:
        _run(argv)
    except GaveUpError as e:
        sys.stderr.write(f"elastic-resume: gave up: {e}\n")
        _decided.append(int(ExitCode.GAVE_UP))
        raise SystemExit(int(ExitCode.GAVE_UP)) from None
    except RegroupError as e:
        # Every rank saved; the launchers re-form the job (without the excluded node): one line.
        sys.stderr.write(f"elastic-resume: {e}\n")
        _decided.append(int(ExitCode.FAILED))
        raise SystemExit(int(ExitCode.FAILED)) from None
    except ElasticResumeError as e:
        if not e.permanent:
            raise
        # A bad root, option or state: every restart would fail the same way. One line, the
        # exit code the launcher does not restart, and no traceback for a user's mistake.
        sys.stderr.write(f"elastic-resume: {type(e).__name__}: {e} (no restart can heal this: exit "
                         f"{int(ExitCode.PERMANENT)}, not retried)\n")
        _decided.append(int(ExitCode.PERMANENT))
        raise SystemExit(int(ExitCode.PERMANENT)) from None
    except SystemExit as e:
        if e.code is None or (isinstance(e.code, int) and not isinstance(e.code, bool)):
            _decided.append(e.code or 0)  # the script chose its status (0, 75 after a save, ...)
        raise
    _decided.append(0)


#: The exit status the script decided (it returned: 0; or it called sys.exit(n)), once known.
_decided: list[int] = []
_kept_open: list[object] = []


def _stacks_on_request() -> None:
    """On SIGUSR2, write every thread's Python stack to the file the launcher reads when it finds
    this worker hung. faulthandler's handler runs in C, so it answers even while the main thread
    is blocked in a collective or a lock (not while the process is stopped: the launcher uses
    py-spy there)."""
    directory, local_rank = os.environ.get(Env.HEARTBEAT_DIR), os.environ.get("LOCAL_RANK", "")
    if not directory or not local_rank.isdigit() or not os.path.isdir(directory):
        return
    from .hangs import stack_path

    try:
        f = open(stack_path(directory, int(local_rank)), "w")  # kept open for the life of the process
        faulthandler.register(signal.SIGUSR2, file=f, all_threads=True)
    except (OSError, ValueError, RuntimeError):
        return
    _kept_open.append(f)


def _leave_if_finished() -> None:
    """Last of the exit handlers: a script that finished, or chose its exit status, leaves with
    that status before the C++ destructors run (see the module's docstring); their abort must
    not turn a finished run, a preemption's 75 or a 76 into a crash. An uncaught exception takes
    the ordinary way out."""
    if not _decided:
        return
    logging.shutdown()  # registered at its import, before this handler: it would run after it
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(_decided[-1])


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
