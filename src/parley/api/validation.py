"""Checks on what clients send, reported in FastAPI's own 422 shape."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any

from fastapi import HTTPException, Path, status
from pydantic import AfterValidator, Field, StringConstraints

USERNAME_MAX_CHARS = 64
IDEMPOTENCY_KEY_MAX_CHARS = 255


def _check_username(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    if any(unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") for char in value):
        raise ValueError("must not contain control characters")
    return value


Username = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=USERNAME_MAX_CHARS),
    AfterValidator(_check_username),
    Field(description="The name the chat belongs to (1-64 characters, no control characters)."),
]

UsernamePath = Annotated[
    str,
    Path(min_length=1, max_length=USERNAME_MAX_CHARS),
    AfterValidator(_check_username),
]


def invalid(location: tuple[str, ...], message: str, kind: str = "value_error") -> HTTPException:
    detail: list[dict[str, Any]] = [{"loc": list(location), "msg": message, "type": kind}]
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)


def check_message(text: str, max_chars: int, location: tuple[str, ...]) -> None:
    if not text.strip():
        raise invalid(location, "must not be empty or only whitespace")
    if len(text) > max_chars:
        raise invalid(location, f"must be at most {max_chars} characters", "string_too_long")


def check_idempotency_key(key: str | None) -> None:
    if key is None:
        return
    if not key or len(key) > IDEMPOTENCY_KEY_MAX_CHARS or not key.isprintable():
        raise invalid(
            ("header", "Idempotency-Key"),
            f"must be 1-{IDEMPOTENCY_KEY_MAX_CHARS} printable characters",
        )
