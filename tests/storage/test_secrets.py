"""Secrets never appear in messages or argument lists."""

from __future__ import annotations

from elastic_resume.storage import redact


def test_redact_removes_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret123")
    text = "bad key optsecret999 and envsecret123"
    assert redact(text, {"secret": "optsecret999"}) == "bad key *** and ***"


def test_every_backends_credential_options_are_redacted():
    conn = "DefaultEndpointsProtocol=http;AccountName=dev;AccountKey=Zm9vYmFyYmF6cXV4;BlobEndpoint=http://127.0.0.1:1/dev;"
    options = {"account_name": "dev", "account_key": "Zm9vYmFyYmF6cXV4", "connection_string": conn,
               "sas_token": "sv=2020&sig=abcdEFGH", "token": {"type": "authorized_user", "client_secret": "gcs-client-s3cret",
                                                               "refresh_token": "gcs-refresh-tok"}}
    text = f"failed with {options!r} and {conn}"
    out = redact(text, options)
    for secret in ("Zm9vYmFyYmF6cXV4", "abcdEFGH", "gcs-client-s3cret", "gcs-refresh-tok"):
        assert secret not in out, secret
    assert "'account_name': 'dev'" in out


def test_credentials_are_redacted_by_their_shape_without_the_options():
    text = ("Cannot connect to host oauth2.googleapis.com/tokeninfo?access_token=ya29.a0AfH6SM&x=1 "
            "https://acct.blob.core.windows.net/c?sv=2020-08-04&sig=s1gnature%3D "
            "AccountKey=c2VjcmV0a2V5; s3://user:p4ssw0rd@host/b Authorization: Bearer eyJhbGciOi.x.y")
    out = redact(text)
    for secret in ("ya29.a0AfH6SM", "s1gnature", "c2VjcmV0a2V5", "p4ssw0rd", "eyJhbGciOi"):
        assert secret not in out, secret
    assert "x=1" in out and "sv=2020-08-04" in out and "s3://user:***@host/b" in out


def test_argument_lists_hide_secret_values_and_only_those():
    from elastic_resume.storage import redact_argv

    assert redact_argv(["train.py", "--secret", "--other", "x"]) == ["train.py", "--secret", "--other", "x"]
    assert redact_argv(["--token", "t0ken-value", "--lr", "0.1"]) == ["--token", "***", "--lr", "0.1"]
    assert redact_argv(["--storage-option", "account_key=abc123", "--storage-option", "account_name=dev"]) == [
        "--storage-option", "account_key=***", "--storage-option", "account_name=dev"]
    assert redact_argv(["--connection-string=AccountKey=k3y;x"]) == ["--connection-string=***"]


def test_doctor_prints_the_worker_command_without_secrets(tmp_path):
    import subprocess
    import sys

    from harness.processes import child_env

    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    r = subprocess.run([sys.executable, "-m", "elastic_resume.cli", "doctor", "--nproc-per-node=1", str(script),
                        "--storage-option", "secret=sup3rsecret", "--token", "t0kenvalue", "--lr", "0.1"],
                       capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "sup3rsecret" not in r.stdout + r.stderr and "t0kenvalue" not in r.stdout + r.stderr
    assert "--lr 0.1" in r.stdout and "secret=***" in r.stdout
