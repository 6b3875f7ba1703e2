"""Jobs under plain ``torchrun`` (``python -m torch.distributed.run``) running ``launch/train_ddp.py``,
and reading what they report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from harness.processes import REPO, child_env

TRAIN = os.path.join(REPO, "launch", "train_ddp.py")


def torchrun(nproc: int, *args: str, max_restarts: int = 0, env: dict[str, str] | None = None,
             timeout: float = 240) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.5", TRAIN, *args]
    e = child_env({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})})
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)


def why(r: subprocess.CompletedProcess[str]) -> str:
    """The workers' own error lines, not the agent's summary."""
    lines = [line for line in r.stderr.splitlines() if line.startswith("[rank") and ("Error" in line or "error" in line)]
    return "\n".join(lines[-12:]) or r.stderr[-3000:]


def losses(path) -> dict[tuple[int, int], list[tuple[float, list[int]]]]:
    out: dict = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out.setdefault((r["rank"], r["step"]), []).append((r["loss"], r["samples"]))
    return out


def root_args(root) -> list[str]:
    return ["--root", root.url, *[f"--storage-option={k}={v}" for k, v in root.storage_options.items()]]
