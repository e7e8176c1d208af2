"""Secrets kept out of error texts and logs.

A provider may echo the request's credentials in an error ("Incorrect API key provided:
sk-..."), and the OpenAI client puts the error's body in its exception's text, which the
log then prints. ``redact`` removes the configured API key, and anything shaped like a
bearer key, from such texts; ``logs`` runs every log line through it.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"
# Shorter "keys" (local servers accept any, such as "x") would blank out ordinary words.
MIN_SECRET_CHARS = 8

_secrets: set[str] = set()
# OpenAI-style keys (sk-..., sk-proj-...), and what follows "Bearer" in a header echoed back.
_KEY_SHAPED = re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/\-]{8,}=*")


def keep_secret(value: str | None) -> None:
    """Have ``redact`` remove this value wherever it appears."""
    if value and len(value) >= MIN_SECRET_CHARS:
        _secrets.add(value)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _BEARER.sub(rf"\1{REDACTED}", _KEY_SHAPED.sub(REDACTED, text))
