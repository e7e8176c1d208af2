"""Searching a user's messages: the index is the database's own full-text search.

The index (``message_search``, see migration 0012) is written by triggers on ``messages``,
so this module only reads it. A query is what the user typed, split at spaces; every
part must match, in any order, and the last one may be the start of a word (a word
still being typed). Each database splits a part into words as it split the messages
when it indexed them, so the two agree: SQLite takes each part as a quoted phrase, and
PostgreSQL runs the query through the function that prepared the messages. What a user
types is never query syntax.
"""

from __future__ import annotations

import asyncio
import functools
import html
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from parley.store import _aware

MAX_QUERY_CHARS = 200
# A snippet's size, in words, and how many come before the first match.
_SNIPPET_WORDS = 24
_SNIPPET_LEAD = 6
# The part of a long message a snippet is looked for in.
_SNIPPET_SOURCE_CHARS = 100_000


class BadQuery(ValueError):
    """A query that cannot be searched for: the reason, for the one who typed it."""


@dataclass(frozen=True, slots=True)
class Hit:
    conversation_id: str
    title: str
    message_id: int
    role: str
    created_at: datetime
    snippet: str  # HTML: the text escaped, the matches in <mark> elements


@functools.cache
def _word() -> re.Pattern[str]:
    """A word: a run of letters, digits and the marks that go on them (``[^\\W_]`` misses
    the marks, and would split "हिन्दी" or "e" followed by a combining accent)."""
    marks = []
    # Marks are in the first two planes and the fourteenth (variation selectors).
    for low, high in ((0, 0x20000), (0xE0000, 0xE1000)):
        start = None
        for point in range(low, high + 1):
            is_mark = point < high and unicodedata.category(chr(point))[0] == "M"
            if is_mark and start is None:
                start = point
            elif not is_mark and start is not None:
                marks.append(f"{re.escape(chr(start))}-{re.escape(chr(point - 1))}")
                start = None
    return re.compile(f"(?:[^\\W_]|[{''.join(marks)}])+")


def parts(query: str) -> list[str]:
    """The parts of a query that hold a word, or ``BadQuery``."""
    if "\ufffd" in query:  # what a URL's bytes that are not UTF-8 decode to
        raise BadQuery("must be valid UTF-8 text")
    found = [part for part in query.split() if _word().search(part)]
    if not found:
        raise BadQuery("must hold a word (letters or digits)")
    return found


def _sqlite_match(owner: str, found: list[str]) -> str:
    owner_token = "o" + owner.encode().hex()
    quoted = ['"' + part.replace('"', '""') + '"' for part in found]
    quoted[-1] += "*"
    return f"owner : {owner_token} AND body : ({' AND '.join(quoted)})"


# Ties in rank go to the newest message, so that pages neither repeat nor skip one.
_SQLITE_SEARCH = sa.text(
    """
    WITH hits AS MATERIALIZED (
        SELECT rowid AS id, rank FROM message_search WHERE message_search MATCH :match
        ORDER BY rank, rowid DESC LIMIT :limit OFFSET :offset
    )
    SELECT messages.conversation_id, conversations.title, hits.id, messages.role,
           messages.created_at, substr(messages.content, 1, :chars)
    FROM hits
    JOIN messages ON messages.id = hits.id
    JOIN conversations ON conversations.id = messages.conversation_id
    WHERE conversations.owner = :owner
    ORDER BY hits.rank, hits.id DESC
    """
)

# The query's words are those ``parley_search_words`` leaves, as the messages' were: all
# of them, the last also as a prefix. (A query that leaves none is null: no match.)
_POSTGRES_SEARCH = sa.text(
    """
    WITH typed AS (
        SELECT regexp_split_to_array(btrim(parley_search_words(:query)), ' +') AS w
    ),
    query AS (
        SELECT CASE WHEN w[1] = '' THEN NULL ELSE to_tsquery('parley_search',
            array_to_string(w[1:cardinality(w) - 1] || (w[cardinality(w)] || ':*'), ' & '))
        END AS q
        FROM typed
    ),
    hits AS (
        SELECT message_id AS id, ts_rank(document, query.q) AS rank
        FROM message_search, query
        WHERE owner = :owner AND document @@ query.q
        ORDER BY rank DESC, message_id DESC
        LIMIT :limit OFFSET :offset
    )
    SELECT messages.conversation_id, conversations.title, hits.id, messages.role,
           messages.created_at, left(messages.content, :chars)
    FROM hits
    JOIN messages ON messages.id = hits.id
    JOIN conversations ON conversations.id = messages.conversation_id
    WHERE conversations.owner = :owner
    ORDER BY hits.rank DESC, hits.id DESC
    """
)


async def search(
    engine: AsyncEngine, owner: str, query: str, *, limit: int, offset: int
) -> list[Hit]:
    """``owner``'s messages matching every part of ``query``, best first: up to ``limit``
    after the first ``offset``."""
    found = parts(query)
    values: dict[str, object] = {
        "owner": owner,
        "limit": limit,
        "offset": offset,
        "chars": _SNIPPET_SOURCE_CHARS,
    }
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            statement = _POSTGRES_SEARCH
            values["query"] = " ".join(found)
        else:
            statement = _SQLITE_SEARCH
            values["match"] = _sqlite_match(owner, found)
        rows = list(await conn.execute(statement, values))
    terms = _word().findall(" ".join(found))
    # Snippets read up to a long message each: off the event loop.
    snippets = await asyncio.to_thread(lambda: [snippet(row[5], terms) for row in rows])
    return [
        Hit(
            conversation_id=row[0],
            title=row[1],
            message_id=row[2],
            role=row[3],
            created_at=_moment(row[4]),
            snippet=made,
        )
        for row, made in zip(rows, snippets, strict=True)
    ]


def _moment(value: datetime | str) -> datetime:
    # Raw SQL on SQLite returns the stored text, which ``_aware`` then reads as UTC.
    return _aware(datetime.fromisoformat(value) if isinstance(value, str) else value)


def _folded(text: str) -> str:
    """A word compared without case or accents (marks)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def snippet(text: str, terms: list[str]) -> str:
    """HTML: the part of ``text`` around its first match (escaped), the words that match
    ``terms`` (the last one as a prefix) in ``<mark>`` elements. Made here rather than by
    the database, so that it is the same on both and keeps the text as it was written
    (PostgreSQL's headline drops what looks like an HTML tag)."""
    wanted = {_folded(term) for term in terms[:-1]}
    prefix = _folded(terms[-1]) if terms else "\0"

    def matches(word: str) -> bool:
        folded = _folded(word)
        return folded in wanted or folded.startswith(prefix)

    spans: list[tuple[int, int]] = []
    first: int | None = None
    ended = True
    for found in _word().finditer(text):
        spans.append(found.span())
        if first is None and matches(found.group()):
            first = len(spans) - 1
        if first is not None and len(spans) >= first + _SNIPPET_WORDS:
            ended = False  # the window is read: the rest of the text is not needed
            break
    # A few words before the first match, and a full window where the text has one.
    start = (first or 0) - _SNIPPET_LEAD
    if ended:
        start = min(start, len(spans) - _SNIPPET_WORDS)
    start = max(0, start)
    last = min(len(spans), start + _SNIPPET_WORDS) - 1
    begin = spans[start][0] if start > 0 else 0
    finish = spans[last][1] if spans and (last < len(spans) - 1 or not ended) else len(text)
    out = ["…"] if begin > 0 else []
    at = begin
    for i in range(start, last + 1):
        left, right = spans[i]
        if matches(text[left:right]):
            out += [html.escape(text[at:left], quote=False), "<mark>"]
            out += [html.escape(text[left:right], quote=False), "</mark>"]
            at = right
    out.append(html.escape(text[at:finish], quote=False))
    if finish < len(text):
        out.append("…")
    return "".join(out).strip()


async def purge_deleted_words(engine: AsyncEngine) -> None:
    """On SQLite, rewrite the index so that deleted messages' words leave it.

    FTS5 (as of the SQLite that Python ships here) deletes by adding a tombstone; the
    words stay in the older index pages until those are merged. Merging everything is
    what removes them; it does nothing on an index already in one piece, and its cost
    grows with the index (see the performance notes). On PostgreSQL a deleted row's
    index entry goes with the row.
    """
    if engine.dialect.name != "sqlite":
        return
    async with engine.begin() as conn:
        await conn.execute(
            sa.text("INSERT INTO message_search (message_search) VALUES ('optimize')")
        )
