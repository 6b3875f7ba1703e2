"""moto's standalone S3 server on 127.0.0.1 (as s3fs's own test suite runs it), with dummy
credentials that never leave this machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from typing import Any

from .processes import free_port, wait_for_port

# Dummy credentials for the local moto server; never real ones.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_moto(extra_env: dict[str, str] | None = None, *, request_log: str | None = None,
               ) -> tuple[subprocess.Popen[Any], str]:
    """A moto server on a free port: (its process, its endpoint URL). Stop it with stop_process.
    ``request_log``: a file for the server's own access log (a line per request)."""
    port = free_port()
    env = dict(os.environ, **(extra_env or {}))
    log = open(request_log, "ab") if request_log else subprocess.DEVNULL  # the child keeps its own copy
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=log, env=env,
        )
    finally:
        if request_log:
            log.close()  # type: ignore[union-attr]
    wait_for_port(port, proc)
    return proc, f"http://127.0.0.1:{port}"


def requests_in_log(request_log: str, method: str, path_part: str) -> int:
    """How many ``method`` requests moto logged for paths containing ``path_part``."""
    with open(request_log, errors="replace") as f:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in f]  # the log colours some lines
    return sum(1 for line in lines if f'"{method} ' in line and path_part in line)


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name
