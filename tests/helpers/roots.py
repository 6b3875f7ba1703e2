"""A checkpoint root a test runs against: local disk or a bucket on the test's S3 server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Root:
    """A checkpoint root for a test: its URL, storage options, and the env a child process
    needs to reach it."""

    kind: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def cli_options(self) -> list[str]:
        return [f"--storage-option={k}={v}" for k, v in self.storage_options.items()]
