"""Secrets never appear in messages or argument lists."""

from __future__ import annotations

from elastic_resume.storage import redact


def test_redact_removes_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret123")
    text = "bad key optsecret999 and envsecret123"
    assert redact(text, {"secret": "optsecret999"}) == "bad key *** and ***"
