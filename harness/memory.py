"""Peak memory of one save, measured in a fresh process (for a test and a benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from harness.processes import child_env

_SAVE = r"""
import json, resource, sys, torch
from elastic_resume import CheckpointManager
from elastic_resume.collectives import LocalGroup
url, options, mib = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
state = {"w": torch.randn(mib * 1024 * 1024 // 4)}
mgr = CheckpointManager(url, keep_last=None, storage_options=options, group=LocalGroup())
mgr.save(0, {"warm": torch.zeros(4)})  # clients, threads and buffers that every save reuses
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mgr.save(1, state)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"added_mib": (after - before) / 1024}))
"""


def save_peak_mib(url: str, options: dict[str, Any], mib: int) -> float:
    """MiB of peak RSS that one blocking save of a ``mib`` MiB state adds, in a fresh process
    (``ru_maxrss`` after building the state against after the save)."""
    r = subprocess.run([sys.executable, "-c", _SAVE, url, json.dumps(options), str(mib)], capture_output=True,
                       text=True, env=child_env(), timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"save to {url.split('://')[0]} failed: {r.stderr.strip()[-2000:]}")
    return float(json.loads(r.stdout.strip().splitlines()[-1])["added_mib"])
