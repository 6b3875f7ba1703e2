"""The error hierarchy: one base, a few subclasses, each message naming what is wrong and where.

Every error this library raises on purpose is an ``ElasticResumeError`` defined here, mixing in
the built-in type callers already catch where there is one (``ConfigError`` is a ``ValueError``,
``StorageError`` an ``OSError``, ``CheckpointNotFoundError`` a ``FileNotFoundError``). The CLI
turns them into a one-line message and an exit code instead of a traceback. Anything else
escaping is a bug in this library. All of them pickle (they travel between ranks).
"""

from __future__ import annotations

from typing import Any

from .contract import ExitCode


class ElasticResumeError(Exception):
    """Base class of every error this library raises on purpose."""

    #: No restart can heal it: the same script with the same flags, root and checkpoint would
    #: fail the same way. A worker it escapes exits ``ExitCode.PERMANENT`` (78) and the launcher
    #: does not restart the group.
    permanent = False


class ConfigError(ElasticResumeError, ValueError):
    """An argument, flag or option has a value that cannot work; the message names it."""

    permanent = True


class DriftError(ConfigError):
    """The run being resumed differs from the one that saved the checkpoint (``drift="fail"``)."""


class ConfigTypeError(ElasticResumeError, TypeError):
    """A value has a type that cannot work (a model output that is no tensor, ...); the message
    names it."""

    permanent = True


class StorageError(ElasticResumeError, OSError):
    """The storage backend refused or failed an operation (missing root, no permission, bad
    credentials, network). Messages never contain secrets."""

    def __init__(self, errno_or_message: int | str, message: str | None = None) -> None:
        if message is None:
            super().__init__(str(errno_or_message))
        else:
            super().__init__(errno_or_message, message)

    def __str__(self) -> str:
        return self.strerror if isinstance(self.strerror, str) else super().__str__()


class BadRootError(StorageError):
    """The checkpoint root cannot be one: a file where a directory belongs, a scheme or bucket
    name that cannot exist. (A root that cannot be reached now is a plain ``StorageError``.)"""

    permanent = True


class FileTooLargeError(StorageError):
    """A file that should be small (a manifest, a JSON record) is larger than the bound it is read
    under: damage or a hostile file, refused before it is read into memory."""


class SizeMismatchError(StorageError):
    """A file is shorter or longer than the size its manifest records."""


class CheckpointCorruptError(ElasticResumeError):
    """A committed checkpoint failed verification: a file is missing, truncated, has the wrong
    digest, or the manifest itself is malformed, of an unknown version, or unsafe."""

    def __init__(self, step: int | None, file: str | None, reason: str) -> None:
        self.step = step
        self.file = file
        self.reason = reason
        where = []
        if step is not None:
            where.append(f"step {step}")
        if file is not None:
            where.append(f"file {file}")
        super().__init__(f"{', '.join(where) or 'checkpoint'}: {reason}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Travels between ranks (torch.distributed.checkpoint gathers exceptions); rebuild it
        # from its fields rather than from the formatted message.
        return (type(self), (self.step, self.file, self.reason))


class UnsafeCheckpointError(CheckpointCorruptError):
    """A data file holds something that could execute code on load (a pickle). It is refused."""


class CheckpointSaveError(ElasticResumeError):
    """A collective save failed on at least one rank; nothing was committed. The message names
    every failing rank and file, and is the same on every rank."""


class ReplicaDivergenceError(CheckpointSaveError):
    """Ranks that must hold identical copies of the parameters (DDP replicas) do not: the step
    is not committed, since no rank's copy can be told good. The guard rolls back to the newest
    committed checkpoint (every one of them agreed when it was saved); without it, a restart
    resumes from there."""

    def __init__(self, message: str, *, step: int, disagreement: Any) -> None:
        super().__init__(message)
        self.step = step
        self.disagreement = disagreement  #: ``replicas.Disagreement``: the odd ranks and parameters


class RegroupError(ElasticResumeError):
    """The job re-forms without a node (a persistent straggler, with exclusion on): every rank
    has saved the current step and exits; the launcher of the excluded node leaves the job and
    the others restart from that step without it. Raised on every rank alike."""


class CommitConflictError(ElasticResumeError):
    """A step that is already committed was committed again; the first commit stays intact."""


class NoCheckpointError(ElasticResumeError):
    """No committed, verifiable checkpoint exists where one was required."""


class CheckpointNotFoundError(NoCheckpointError, FileNotFoundError):
    """Nothing at all exists at the checkpoint path given (also a ``FileNotFoundError``, which
    is what Lightning and other callers of a ``CheckpointIO`` expect for a missing path)."""

    def __init__(self, message: str) -> None:
        NoCheckpointError.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StateError(ElasticResumeError):
    """The training state given to save/restore does not fit the checkpoint (unsupported value
    type, missing key, shape mismatch); the message names the key path."""

    permanent = True


class GaveUpError(ElasticResumeError):
    """The run cannot go on by itself: the rollback budget is spent, no checkpoint is old
    enough to roll back to, or a detector asked to stop. Do not retry (exit code 76)."""

    exit_code = ExitCode.GAVE_UP


class CheckpointUnreadableError(CheckpointCorruptError):
    """A file of a committed checkpoint could not be read (permission denied, I/O error): the
    step is not loadable, like a corrupt one, but nothing says its bytes are damaged."""


class UnsupportedVersionError(ElasticResumeError, ImportError):
    """An installed library (torch, Lightning) is outside the releases the code that touches its
    internals was written for; the message names the supported range."""
