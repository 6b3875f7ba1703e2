"""Names on disk: where a step, its manifest and its data files live under a root, and what a
save attempt is called. Pure functions over strings; nothing here reads or writes.

Layout under a root::

    step-000000001200/MANIFEST.json               written last, create-only: the commit
    step-000000001200/<attempt>/shared-00000.safetensors  data files (.ert before 0.6), in the manifest
    resume-attempts.json                          resumes counted per step (crash loops)
    .prune.lock                                   one prune at a time

Data files live under an attempt id agreed by all ranks of one save, so a zombie writer of an
older attempt can never overwrite what a committed manifest points to. Attempt ids start with
rank 0's clock, which is how retention tells a save in flight from an abandoned one.
"""

from __future__ import annotations

import calendar
import re
import time
import uuid
from typing import Any, TypeGuard

from ..contract import StrEnum

MANIFEST_NAME = "MANIFEST.json"
STEP_PREFIX = "step-"
STEP_DIGITS = 12
#: Root-level file counting resumes per step, for the crash-loop fallback.
RESUME_LOG = "resume-attempts.json"
#: Root-level file holding the last rollback decided by the spike guard, written before it is
#: carried out (a crash in between finishes the same rollback at the next start).
ROLLBACK_DECISION = "rollback-decision.json"
PRUNE_LOCK = ".prune.lock"

_STEP_RE = re.compile(rf"^step-([0-9]{{{STEP_DIGITS},}})$")
_SAFE_COMPONENT = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_SAFE_REL_RE = re.compile(rf"^{_SAFE_COMPONENT}(/{_SAFE_COMPONENT})*$")
ATTEMPT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ATTEMPT_TIME_RE = re.compile(r"^(\d{8}T\d{6})-")


class FileKind(StrEnum):
    """Who needs a data file of a step."""

    #: One rank's own state (RNG streams, ``PerRank`` values): read by that rank.
    RANK = "rank"
    #: A slice of the replicated state (the first also carries its structure): read by every rank.
    SHARED = "shared"
    #: Sharded (DTensor) state written through torch.distributed.checkpoint.
    DCP = "dcp"
    #: The index of the sharded state (DCP's metadata, as JSON).
    DCP_META = "dcp-meta"


def step_dir(step: int) -> str:
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step_dir(name: str) -> int | None:
    """The step a directory name holds, only for the one spelling :func:`step_dir` writes (ASCII
    digits, zero-padded to 12): ``step-0000000000001`` or Unicode digits never alias step 1."""
    m = _STEP_RE.match(name)
    if not m:
        return None
    step = int(m.group(1))
    return step if step_dir(step) == name else None


def manifest_path(step: int) -> str:
    return f"{step_dir(step)}/{MANIFEST_NAME}"


#: Suffix of the data files written now (safetensors files; ``.ert`` before 0.6, still read).
DATA_SUFFIX = ".safetensors"


def data_file(attempt: str, rank: int, kind: str = FileKind.RANK) -> str:
    return f"{attempt}/{kind}-{rank:05d}{DATA_SUFFIX}"


def new_attempt_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:10]


def attempt_time(attempt: str) -> float | None:
    """When a save began, from its attempt id (rank 0's clock), or None for a foreign name."""
    m = _ATTEMPT_TIME_RE.match(attempt)
    if not m:
        return None
    try:
        return float(calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%S")))
    except ValueError:
        return None


def is_safe_relative_path(path: Any) -> TypeGuard[str]:
    """True for 'a/b.c'-style paths that stay inside their step directory: no '..', no leading
    '/', no scheme or other bucket, no empty or '.'-only components."""
    return isinstance(path, str) and len(path) < 1024 and bool(_SAFE_REL_RE.match(path))
