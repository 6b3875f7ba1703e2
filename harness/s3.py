"""moto's standalone S3 server on 127.0.0.1 (as s3fs's own test suite runs it), with dummy
credentials that never leave this machine."""

from __future__ import annotations

import os
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


def start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[Any], str]:
    """A moto server on a free port: (its process, its endpoint URL). Stop it with stop_process."""
    port = free_port()
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    wait_for_port(port, proc)
    return proc, f"http://127.0.0.1:{port}"


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name
