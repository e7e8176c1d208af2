"""Searching the caller's messages (``GET /api/search``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from parley import search, turns
from parley.api.identity import User
from parley.api.validation import StorableText, invalid

router = APIRouter(prefix="/api", tags=["search"])

RESULTS_PAGE = 20
RESULTS_PAGE_MAX = 50
# How far a search pages: past this, a narrower query finds it sooner.
MAX_OFFSET = 1000


class SearchResult(BaseModel):
    conversation_id: str
    title: str = Field(description="The conversation's title.")
    message_id: int = Field(
        description="The message: `GET .../messages?leaf=` with it opens its branch."
    )
    role: Literal["user", "assistant"]
    created_at: datetime
    snippet: str = Field(
        description="HTML: the message's text around the matches (escaped), each match in "
        "a `<mark>` element."
    )


class SearchPage(BaseModel):
    results: list[SearchResult] = Field(description="The best matches first.")
    next_offset: int | None = Field(
        description="The `offset` of the next page; null on the last one."
    )


@router.get("/search", response_model=SearchPage)
async def search_messages(
    user: User,
    q: Annotated[
        str,
        StorableText,
        Query(
            min_length=1,
            max_length=search.MAX_QUERY_CHARS,
            description="Words to find, in any order; the last one may be the start of a "
            "word. Case and accents do not matter.",
        ),
    ],
    limit: Annotated[int, Query(ge=1, le=RESULTS_PAGE_MAX)] = RESULTS_PAGE,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> SearchPage:
    """The caller's messages that hold every word of ``q``, best first."""
    try:
        hits = await search.search(
            turns.services().store.engine, user, q, limit=limit + 1, offset=offset
        )
    except search.BadQuery as refusal:
        raise invalid(("query", "q"), str(refusal)) from None
    return SearchPage(
        results=[SearchResult.model_validate(hit, from_attributes=True) for hit in hits[:limit]],
        next_offset=offset + limit if len(hits) > limit else None,
    )
