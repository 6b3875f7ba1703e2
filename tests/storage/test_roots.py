"""Bad roots and bad credentials: a clear error naming the root, no secret in any message."""

from __future__ import annotations

import os

import pytest
import torch

from elastic_resume import CheckpointManager, ConfigError, StorageError
from harness.processes import stop_process
from harness.s3 import S3_ENV, make_bucket, start_moto


def test_root_under_a_regular_file_is_refused(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=rf"cannot create checkpoint root {blocker}/ckpt"):
        CheckpointManager(str(blocker / "ckpt"))


def test_root_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StorageError, match="exists but is not a directory"):
        CheckpointManager(str(f))


def test_read_only_root_that_does_not_exist(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        CheckpointManager(str(tmp_path / "missing"), read_only=True)


def test_unwritable_root_is_refused(tmp_path):
    # Root ignores permission bits, so use a file system that is read-only for everyone.
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    with pytest.raises(StorageError, match=r"/proc/self/ckpt"):
        CheckpointManager("/proc/self/ckpt")


def test_unknown_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unsupported scheme 'hdfs'.*gs://, az:// or memory://"):
        CheckpointManager("hdfs://namenode/x")


def test_missing_bucket_is_named(s3_endpoint):
    with pytest.raises(StorageError, match="s3://no-such-bucket-xyz"):
        CheckpointManager("s3://no-such-bucket-xyz/run", storage_options={"endpoint_url": s3_endpoint})


def test_wrong_s3_credentials_error_hides_secret():
    """A moto server that authenticates every request (INITIAL_NO_AUTH_ACTION_COUNT=0): our
    made-up keys are unknown to it, the error says so, and the secret never appears."""
    secret = "SuperSecretValue/ShouldNeverBePrinted0123"
    proc, endpoint = start_moto({**S3_ENV, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        with pytest.raises(StorageError) as info:
            CheckpointManager(
                "s3://locked-bucket/run",
                storage_options={"endpoint_url": endpoint, "key": "AKIAWRONGKEY", "secret": secret},
            )
        text = str(info.value)
        assert "s3://locked-bucket" in text and "denied" in text
        assert secret not in text and "AKIAWRONGKEY" not in text
        assert repr(info.value).count(secret) == 0
    finally:
        stop_process(proc)


def test_s3_settings_from_environment(s3_endpoint, monkeypatch):
    """AWS_ENDPOINT_URL and the credential variables are honoured without storage options."""
    bucket = make_bucket(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    mgr = CheckpointManager(f"s3://{bucket}/envrun")
    mgr.save(1, {"x": torch.arange(4)})
    state = {"x": None}
    assert CheckpointManager(f"s3://{bucket}/envrun").restore(state) == 1
    assert torch.equal(state["x"], torch.arange(4))
