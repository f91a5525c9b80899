"""Credentials never written, printed or shipped in clear: a URL's password is kept only redacted
(``USER:***@``), in ``meta.json`` and messages, and taken back from the environment (:func:`restore`) to
connect; secrets (:func:`is_secret`) never go into a Ray job's runtime environment, which Ray's dashboard shows.
"""
from __future__ import annotations

import re

_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/]*):(?P<password>[^@/]*)@")
_SECRET_KEY = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE_KEY|API_KEY|ACCESS_KEY)", re.I)
_NOT_SECRET = {"AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS", "AWS_SHARED_CREDENTIALS_FILE", "PGPASSFILE"}
"""Names that match :data:`_SECRET_KEY` but hold an identifier or a path, not a secret."""


def redact(text: str) -> str:
    """``text`` with the password of a URL at its start (``scheme://user:password@``) replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@" if m["password"] else m[0], str(text))


def redact_all(text: str) -> str:
    """Every ``scheme://user:password@`` in a message, redacted."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]+", lambda m: redact(m[0]), str(text))


def restore(url: str, *candidates: str | None) -> str:
    """``url`` as recorded (maybe redacted), with its password from the first candidate (a URL from the
    environment) whose redacted form is the same; ``url`` itself when none matches."""
    return next((candidate for candidate in candidates if candidate and redact(candidate) == url), url)


def is_secret(key: str, value: str = "") -> bool:
    """Whether an environment variable holds a secret: its name says so, or its value is a URL with a password."""
    return (key not in _NOT_SECRET and bool(_SECRET_KEY.search(key))) or redact(value) != value
