"""Credentials stay out of every message, log line and argument list this library prints."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any


def _secrets_from(options: dict[str, Any]) -> list[str]:
    found = []
    for key in ("secret", "token", "aws_secret_access_key", "aws_session_token", "key", "aws_access_key_id"):
        v = options.get(key)
        if isinstance(v, str) and v:
            found.append(v)
    for nested in ("client_kwargs", "config_kwargs"):
        if isinstance(options.get(nested), dict):
            found.extend(_secrets_from(options[nested]))
    for env in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        v = os.environ.get(env)
        if v:
            found.append(v)
    return found


def redact(text: str, options: dict[str, Any] | None = None) -> str:
    """Remove credential values from a message (error texts from botocore can echo keys)."""
    for secret in sorted(set(_secrets_from(options or {})), key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


_SECRET_NAME = re.compile(r"secret|token|passw|credential|api[_-]?key|access[_-]?key|private[_-]?key|^key$|auth",
                          re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether an option or flag name (``secret``, ``--aws-secret-access-key``, ``token``...)
    names a credential whose value must never be shown."""
    return bool(_SECRET_NAME.search(name.strip().lstrip("-").rsplit(".", 1)[-1]))


def redact_argv(argv: Sequence[str]) -> list[str]:
    """An argument list safe to log: values of secret-named ``KEY=VALUE`` words and of
    secret-named flags (``--token X``, ``--token=X``, ``--storage-option secret=X``) become
    ``***``, and credential values from the environment are removed wherever they stand."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        head, sep, value = arg.partition("=")
        if hide_next:
            hide_next = False
            # The value of a secret flag, or the KEY=VALUE after --storage-option: shown only
            # when it is a KEY=VALUE whose key names no secret.
            if sep and not is_secret_name(head):
                out.append(redact(arg))
            else:
                out.append(f"{head}=***" if sep else "***")
            continue
        if arg.startswith("-") and not sep:
            hide_next = is_secret_name(arg) or arg.lstrip("-") == "storage-option"
            out.append(arg)
        elif sep and head.startswith("-") and head.lstrip("-") == "storage-option":
            key = value.partition("=")[0]
            out.append(f"{head}={key}=***" if is_secret_name(key) or "=" not in value else redact(arg))
        elif sep and is_secret_name(head):
            out.append(f"{head}=***")
        else:
            out.append(redact(arg))
    return out
