"""Run a child with only one Lightning namespace importable (see ``hide_modules``)."""

from __future__ import annotations

import os

from harness.processes import REPO

HIDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hide_modules")

#: namespace -> the packages hidden so that only it can be imported
HIDDEN_FOR = {"pytorch_lightning": "lightning", "lightning": "pytorch_lightning,lightning_fabric"}


def only(namespace: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process in which only ``namespace`` imports."""
    env = dict(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HIDE_DIR, REPO, os.environ.get("PYTHONPATH", "")) if p)
    env["ER_TEST_HIDE_MODULES"] = HIDDEN_FOR[namespace]
    return env
