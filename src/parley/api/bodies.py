"""JSON bodies parsed strictly, and validation errors that can always be written back.

Python's JSON parser takes ``NaN``, ``Infinity`` and ``-Infinity`` (which are not JSON),
turns ``1e999`` into an infinity, and keeps lone surrogates (``"\\ud800"``, not Unicode
text) in strings. None of them can be stored or written back as JSON. ``CheckedRoute``
refuses them wherever they are in a body, with a 422 that names where.

FastAPI's own 422 answer echoes the input, and an input holding NaN, an infinity or a
lone surrogate cannot be written as JSON: the refusal itself failed with a 500.
``validation_failed`` answers in the same shape (``detail``: ``type``, ``loc``, ``msg``,
``input``, ``ctx``) with such values made safe.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from fastapi import HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

# Enough to say what is wrong with a body; a body of ten thousand NaNs gets the first ones.
MAX_PROBLEMS = 20
# How deep an echoed input is written back; deeper parts are elided.
MAX_ECHO_DEPTH = 8

_SURROGATES = re.compile("[\ud800-\udfff]")


class _NotJson:
    """A number in a body that JSON does not carry, as it was written."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _float(text: str) -> float | _NotJson:
    value = float(text)
    return value if math.isfinite(value) else _NotJson(text)


def _int(text: str) -> int | _NotJson:
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return _NotJson(text)


def loads(body: bytes) -> Any:
    """A JSON body, or a 422 naming every place that holds what JSON does not allow."""
    value = json.loads(body, parse_float=_float, parse_int=_int, parse_constant=_NotJson)
    problems = []
    for location, message, kind in _problems(value):
        # The shape of parley.api.validation.invalid's, and of FastAPI's own.
        problems.append({"loc": ["body", *location], "msg": message, "type": kind})
        if len(problems) == MAX_PROBLEMS:
            break
    if problems:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=problems)
    return value


def _is_text(value: str) -> bool:
    return _SURROGATES.search(value) is None


def _problems(value: Any) -> Iterator[tuple[tuple[Any, ...], str, str]]:
    # A walk with a stack of its own: the parser accepts deeper nesting than a recursive
    # walk would survive.
    pending: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    while pending:
        location, item = pending.pop()
        if isinstance(item, str):
            if not _is_text(item):
                yield (
                    location,
                    "must be valid Unicode text (it holds a lone surrogate)",
                    ("string_unicode"),
                )
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                if not _is_text(key):
                    key = json_safe(key)
                    yield (*location, key), "must be a key of valid Unicode text", "string_unicode"
                children.append(((*location, key), child))
            pending.extend(reversed(children))
        elif isinstance(item, list):
            pending.extend(reversed([((*location, i), child) for i, child in enumerate(item)]))
        elif isinstance(item, _NotJson):
            shown = item.text if len(item.text) <= 20 else item.text[:20] + "..."
            yield (
                location,
                f"must be a number JSON can carry, not {shown} (NaN, Infinity and numbers "
                "out of range are not JSON)",
                "json_number",
            )


class CheckedJsonRequest(Request):
    async def json(self) -> Any:
        return loads(await self.body())


class CheckedRoute(APIRoute):
    """A route whose JSON body is parsed by ``loads``: NaN, infinities and lone
    surrogates anywhere in it are refused with a 422 naming where."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(CheckedJsonRequest(request.scope, request.receive))

        return checked


# --- Validation errors, written back safely -------------------------------------------


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` as something JSON can carry: lone surrogates become U+FFFD, non-finite
    numbers their names, other objects their text; nesting deeper than
    ``MAX_ECHO_DEPTH`` is elided."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return _SURROGATES.sub("\ufffd", value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, _NotJson):
        return value.text
    if depth >= MAX_ECHO_DEPTH:
        return "..."
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item, depth + 1) for item in value]
    return json_safe(str(value))


def safe_errors(errors: Any) -> list[dict[str, Any]]:
    detail = []
    for error in errors:
        entry: dict[str, Any] = {
            "type": json_safe(error.get("type", "value_error")),
            "loc": [json_safe(part) for part in error.get("loc", ())],
            "msg": json_safe(error.get("msg", "")),
        }
        if "input" in error:
            entry["input"] = json_safe(error["input"])
        if error.get("ctx"):
            entry["ctx"] = json_safe(error["ctx"])
        detail.append(entry)
    return detail


async def validation_failed(_request: Request, error: Exception) -> JSONResponse:
    """FastAPI's 422 for a request that failed validation, always writable as JSON."""
    assert isinstance(error, RequestValidationError)
    return JSONResponse(
        {"detail": safe_errors(error.errors())},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )
