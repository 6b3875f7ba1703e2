"""Credentials stay out of every message, log line and argument list this library prints.

One redaction serves every path that prints or logs (``redact`` for text, ``redact_argv`` for
argument lists). It removes:

- the values of every documented credential option of each backend, wherever they stand in the
  text (nested option dicts included, e.g. a GCS ``token`` given as a service-account dict):
  S3 ``key``, ``secret``, ``token``, ``aws_access_key_id``, ``aws_secret_access_key``,
  ``aws_session_token``; GCS ``token``, ``access_token``, ``refresh_token``, ``client_secret``,
  ``private_key``; Azure ``account_key``, ``connection_string``, ``sas_token``, ``credential``,
  ``client_secret``, ``password``; and any option whose name says it is one (:func:`is_secret_name`);
- the same credentials from the environment (``AWS_*``, ``AZURE_STORAGE_*``, ``AZURE_CLIENT_SECRET``);
- credentials by their shape: URL query parameters named like a credential
  (``?access_token=``, ``&sig=``, ``X-Amz-Signature=``), ``AccountKey=``/``SharedAccessSignature=``
  in connection strings, ``user:password@`` in URLs and ``Bearer`` tokens.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

MASK = "***"

_SECRET_NAME = re.compile(
    r"secret|token|passw|credential|api[_-]?key|access[_-]?key|private[_-]?key|account[_-]?key|"
    r"connection[_-]?string|^sas|^sig$|signature|^key$|auth",
    re.IGNORECASE)
_ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AZURE_STORAGE_KEY",
                "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
                "AZURE_CLIENT_SECRET", "GOOGLE_OAUTH_ACCESS_TOKEN")
_QUERY_PARAM = re.compile(r"([?&;])([A-Za-z0-9_.\-]{1,64})=([^&#;\s'\"]+)")
#: A connection string's credential (``AccountKey=...;``): masked in text by its shape, and taken
#: out of a ``connection_string`` option so the key alone is found wherever it is echoed.
_CONNECTION_SECRET = re.compile(r"((?:AccountKey|SharedAccessSignature|SharedAccessKey)=)([^;'\"\s]+)", re.IGNORECASE)
_SHAPES = (
    (_CONNECTION_SECRET, rf"\g<1>{MASK}"),
    (re.compile(r"(://[^/\s:@'\"]+:)[^@/\s'\"]+@"), rf"\g<1>{MASK}@"),
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/\-]+=*", re.IGNORECASE), rf"\g<1>{MASK}"),
)


def is_secret_name(name: str) -> bool:
    """Whether an option or flag name (``secret``, ``--aws-secret-access-key``, ``account_key``,
    ``connection_string``...) names a credential whose value must never be shown."""
    return bool(_SECRET_NAME.search(name.strip().lstrip("-").rsplit(".", 1)[-1]))


def _values(value: Any) -> list[str]:
    """Every string inside a credential's value (a GCS token may be a dict)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _values(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _values(v)]
    return []


def _option_secrets(options: dict[str, Any]) -> list[str]:
    """The values of secret-named options, nested dicts included (client_kwargs, credentials)."""
    found = []
    for key, value in options.items():
        if isinstance(key, str) and is_secret_name(key):
            found.extend(_values(value))
        elif isinstance(value, dict):
            found.extend(_option_secrets(value))
    return found


def _secrets_from(options: dict[str, Any]) -> list[str]:
    """Every credential value to remove: the options', the environment's, and the key inside
    each connection string among them."""
    found = _option_secrets(options) + [v for env in _ENV_SECRETS if (v := os.environ.get(env))]
    return found + [m.group(2) for text in found for m in _CONNECTION_SECRET.finditer(text)]


def _by_shape(text: str) -> str:
    text = _QUERY_PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}={MASK}" if is_secret_name(m.group(2)) else m.group(0),
                            text)
    for pattern, mask in _SHAPES:
        text = pattern.sub(mask, text)
    return text


def redact(text: str, options: dict[str, Any] | None = None) -> str:
    """``text`` without credentials: the values of ``options``' (and the environment's)
    credentials, and anything shaped like one (see the module's docstring)."""
    for secret in sorted(set(_secrets_from(options or {})), key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, MASK)
    return _by_shape(text)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """An argument list safe to log: values of secret-named ``KEY=VALUE`` words and of
    secret-named flags (``--token X``, ``--token=X``, ``--storage-option secret=X``) become
    ``***`` (a flag that follows a secret flag is a flag, not its value), and credentials from
    the environment or shaped like one are removed wherever they stand."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        head, sep, value = arg.partition("=")
        if hide_next and not (arg.startswith("-") and len(arg) > 1):
            hide_next = False
            # The value of a secret flag, or the KEY=VALUE after --storage-option: shown only
            # when it is a KEY=VALUE whose key names no secret.
            if sep and not is_secret_name(head):
                out.append(redact(arg))
            else:
                out.append(f"{head}={MASK}" if sep else MASK)
            continue
        hide_next = False
        if arg.startswith("-") and not sep:
            hide_next = is_secret_name(arg) or arg.lstrip("-") == "storage-option"
            out.append(arg)
        elif sep and head.startswith("-") and head.lstrip("-") == "storage-option":
            key = value.partition("=")[0]
            out.append(f"{head}={key}={MASK}" if is_secret_name(key) or "=" not in value else redact(arg))
        elif sep and is_secret_name(head):
            out.append(f"{head}={MASK}")
        else:
            out.append(redact(arg))
    return out
