"""Checks on what clients send, reported in FastAPI's own 422 shape."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import HTTPException, Path, status
from pydantic import AfterValidator, Field, StringConstraints, TypeAdapter, ValidationError

USERNAME_MAX_CHARS = 64
IDEMPOTENCY_KEY_MAX_CHARS = 255


# Code points that show nothing (Unicode's Default_Ignorable_Code_Point, less the format
# characters refused as category Cf anyway), and blanks that look like a space.
_INVISIBLE = (
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x115F, 0x1160),  # Hangul fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian variation selectors
    (0x2800, 0x2800),  # braille blank
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xE0100, 0xE01EF),  # variation selectors supplement
)
# The first word of a letter's Unicode name is its script, but for these.
# (Checked against the Script property of the regex package: it disagrees only on marks
# counted here as shared, and on a few letters that Unicode counts as Common.)
_SCRIPT_WORDS = {
    "CJK": "Han",
    "IDEOGRAPHIC": "Han",
    "MASU": "Han",
    "VIETNAMESE": "Han",
    "HENTAIGANA": "Hiragana",
    "KATAKANA-HIRAGANA": "Katakana",  # the prolonged sound mark: either kana
    "TURNED": "Latin",
    "ROMAN": "Latin",
    # Marks and modifiers that go with any script.
    "COMBINING": None,
    "MODIFIER": None,
    "CARON": None,
    "VERTICAL": None,
    "MUSICAL": None,
    "VEDIC": None,
}
_SHARED_LETTERS = {0x3031, 0x3032, 0x3033, 0x3034, 0x3035}  # kana repeat marks
# Scripts a name may mix (Unicode's "highly restrictive" level, UTS #39): Japanese,
# Chinese with Bopomofo, Korean; each with Latin.
_SCRIPT_MIXES = (
    frozenset({"Latin", "Han", "Hiragana", "Katakana"}),
    frozenset({"Latin", "Han", "Bopomofo"}),
    frozenset({"Latin", "Han", "Hangul"}),
)


def _invisible(char: str) -> bool:
    point = ord(char)
    return any(low <= point <= high for low, high in _INVISIBLE)


def _script(char: str) -> str | None:
    """The script of a letter or mark, or None for what every script shares (digits,
    punctuation, symbols, spaces, combining marks)."""
    if unicodedata.category(char)[0] not in "LM" or ord(char) in _SHARED_LETTERS:
        return None
    word = unicodedata.name(char, "UNNAMED").split(" ", 1)[0]
    if word in _SCRIPT_WORDS:
        return _SCRIPT_WORDS[word]
    return word.title()


def _check_username(value: str) -> str:
    # One spelling for what looks the same: NFC and NFD "josé" are one name, and so are
    # "ｊｏｓé" and "josé".
    value = unicodedata.normalize("NFKC", value)
    if len(value) > USERNAME_MAX_CHARS:
        raise ValueError(f"must be at most {USERNAME_MAX_CHARS} characters")
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    if value != value.strip():
        raise ValueError("must not begin or end with a space")
    if any(unicodedata.category(char)[0] in "CZ" and char != " " for char in value):
        raise ValueError(
            "must not contain control, format or unassigned characters, or spaces but ' '"
        )
    if any(_invisible(char) for char in value):
        raise ValueError("must not contain invisible characters")
    if "/" in value or value in (".", ".."):
        # A name's own URL (/history/{name}) could not be written.
        raise ValueError("must not contain '/' or be '.' or '..'")
    scripts = {script for char in value if (script := _script(char)) is not None}
    if len(scripts) > 1 and not any(scripts <= allowed for allowed in _SCRIPT_MIXES):
        raise ValueError(
            "must not mix letters of different scripts (here " + ", ".join(sorted(scripts)) + ")"
        )
    return value


Username = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=USERNAME_MAX_CHARS),
    AfterValidator(_check_username),
    Field(
        description=(
            "The name the chat belongs to: 1-64 characters after NFKC normalisation; no "
            "control or invisible characters, no spaces at either end, no '/', and letters "
            "of one script (or Japanese, Chinese or Korean ones together, with Latin)."
        )
    ),
]


def _check_sign_in_name(value: str) -> str:
    # The rules names had before the ones above, so that an account made then still
    # signs in; only what no database can store or compare is refused.
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    if any(unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp") for char in value):
        raise ValueError("must not contain control characters")
    return value


SignInName = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=USERNAME_MAX_CHARS),
    AfterValidator(_check_sign_in_name),
    Field(description="The account's name, in any case or Unicode spelling."),
]


# A name in a path that is only compared with an account's (``/history/{username}`` in
# accounts mode): the sign-in rules, so that a name from before today's rules still works.
NamePath = Annotated[
    str,
    Path(min_length=1, max_length=USERNAME_MAX_CHARS),
    AfterValidator(_check_sign_in_name),
]


_new_name = TypeAdapter(Username)


def open_mode_name(value: str, location: tuple[str, ...]) -> str:
    """A name as open mode's conversations belong to it: checked by the rules for names
    (and normalised), or a 422 at ``location``."""
    try:
        return _new_name.validate_python(value)
    except ValidationError as error:
        raise invalid(location, error.errors()[0]["msg"]) from None


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


def same_name(one: str, other: str) -> bool:
    """Whether two user names are the same account's (as ``accounts.username_key`` has it)."""
    from parley.accounts import username_key

    return username_key(one) == username_key(other)


# --- Text that can be stored ---------------------------------------------------------
# A JSON string may carry a lone surrogate ("\ud800"): not Unicode text, so no UTF-8
# encoder, SQLite or PostgreSQL takes it. NUL ("\u0000") is Unicode, but PostgreSQL's
# text cannot hold it. Both are refused where a client's text comes in, naming the field.


def check_unicode(value: str) -> str:
    """Refuse a string that is not Unicode text (it holds a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return value


def check_text(value: str) -> str:
    """Refuse a string that no database column can hold: a lone surrogate, or NUL."""
    check_unicode(value)
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


# For ``Annotated[StrictStr, StorableText]``: every string a client sends that is stored.
StorableText = AfterValidator(check_text)
# For strings that are never stored as text (a password is only hashed).
ValidUnicode = AfterValidator(check_unicode)


def check_instant(value: datetime) -> datetime:
    """A time to compare stored times with, in UTC (a time without an offset is taken to
    be UTC). One that UTC cannot hold (year 1 at +14:00, year 9999 at -14:00) is
    refused."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range: in UTC it falls outside the years 1 to 9999") from None


Instant = Annotated[datetime, AfterValidator(check_instant)]
# The largest id a database integer holds: query parameters naming an id stop there.
MAX_ID = 2**63 - 1
