"""Exports and imports of the caller's conversations (see ``parley.archive``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi import status as http_status
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from parley import archive, turns
from parley.api.conversations import NOT_FOUND, ConversationId, _not_found
from parley.api.identity import User
from parley.store import ConversationNotFound

router = APIRouter(prefix="/api", tags=["export and import"])
# Imports take larger bodies than every other request: the app includes this router with
# ``PARLEY_MAX_IMPORT_BYTES`` as its limit instead of ``PARLEY_MAX_BODY_BYTES``.
imports = APIRouter(prefix="/api", tags=["export and import"])


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


@router.get(
    "/conversations/{conversation_id}/export",
    responses={
        **NOT_FOUND,
        200: {
            "content": {"application/json": {}, "text/markdown": {}},
            "description": "Parley's JSON (every branch) or Markdown (the current branch).",
        },
    },
    response_class=Response,
)
async def export_conversation(
    user: User,
    conversation_id: ConversationId,
    format: Annotated[
        Literal["json", "markdown"],
        Query(description="`json`: every branch, importable; `markdown`: for reading."),
    ] = "json",
) -> Response:
    """One conversation, as a file to download."""
    engine = turns.services().store.engine
    try:
        found = await archive.read_conversation(engine, user, str(conversation_id))
    except ConversationNotFound:
        raise _not_found() from None
    if format == "markdown":
        return Response(
            archive.markdown(found),
            media_type="text/markdown; charset=utf-8",
            headers=_attachment(f"parley-{found.id}.md"),
        )

    async def one() -> AsyncIterator[archive.StoredConversation]:
        yield found

    return StreamingResponse(
        archive.json_document(one()),
        media_type="application/json",
        headers=_attachment(f"parley-{found.id}.json"),
    )


@router.get(
    "/export",
    responses={200: {"content": {"application/json": {}}, "description": "Parley's JSON."}},
    response_class=StreamingResponse,
)
async def export_all(user: User) -> StreamingResponse:
    """Every conversation of the caller, every branch, as one JSON document. It is
    written while it is read, a page of conversations at a time."""
    engine = turns.services().store.engine
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    return StreamingResponse(
        archive.json_document(archive.all_conversations(engine, user)),
        media_type="application/json",
        headers=_attachment(f"parley-export-{day}.json"),
    )


class ImportOut(BaseModel):
    created: int = Field(description="Conversations created.")
    skipped: int = Field(
        description="Conversations imported before (or, from Parley, still yours): unchanged."
    )
    conversations: list[str] = Field(description="The ids of the conversations created.")


_IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "description": "A Parley export (`GET /api/export`, or one conversation's JSON) or "
        "ChatGPT's `conversations.json`, as the body itself.",
        "content": {"application/json": {"schema": {}}},
    }
}


@imports.post(
    "/import",
    status_code=http_status.HTTP_201_CREATED,
    response_model=ImportOut,
    responses={
        200: {"model": ImportOut, "description": "Everything in the file was here already."},
        413: {"description": "The file is larger than `PARLEY_MAX_IMPORT_BYTES`."},
        422: {"description": "What is wrong with the file; nothing was imported."},
    },
    openapi_extra=_IMPORT_BODY,
)
async def import_conversations(user: User, request: Request) -> Response:
    """Import conversations: all of the file or none of it. They become the caller's,
    with their titles, times and branches, and a chat continues where it left off.
    Importing a file again creates nothing new."""
    settings = request.app.state.settings
    gate: ImportGate = request.app.state.import_gate
    async with gate.turn():
        return await _import(user, request, settings)


class ImportGate:
    """Imports read a whole file into memory and parse it: a few run at once in a
    process, a few more wait, and the rest are refused (503) rather than queued without
    end."""

    def __init__(self, at_once: int = 2, waiting: int = 8) -> None:
        self._running = asyncio.Semaphore(at_once)
        self._most = at_once + waiting
        self._in = 0

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if self._in >= self._most:
            raise HTTPException(
                http_status.HTTP_503_SERVICE_UNAVAILABLE,
                detail="Too many imports at once; try again shortly.",
                headers={"Retry-After": "10"},
            )
        self._in += 1
        try:
            async with self._running:
                yield
        finally:
            self._in -= 1


async def _import(user: str, request: Request, settings: Any) -> Response:
    body = await _read_body(request)
    try:
        found = await asyncio.to_thread(
            archive.read_import, body, max_prompt_chars=settings.max_message_chars
        )
    except archive.ImportRefused as refusal:
        raise HTTPException(
            http_status.HTTP_422_UNPROCESSABLE_CONTENT, detail=refusal.problems
        ) from None
    del body
    result = await archive.write_import(
        turns.services().store.engine,
        user,
        found,
        models=request.app.state.models.names,
        account=settings.auth == "accounts",
    )
    out = ImportOut(
        created=len(result.created), skipped=result.skipped, conversations=result.created
    )
    code = http_status.HTTP_201_CREATED if result.created else http_status.HTTP_200_OK
    return JSONResponse(out.model_dump(), status_code=code)


async def _read_body(request: Request) -> bytes:
    # The size is limited by the router's ``max_body_size`` (see ``imports``): 413.
    body = await request.body()
    if not body.strip():
        raise HTTPException(
            http_status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=[
                {"loc": ["body"], "msg": "is empty: send the file as the body", "type": "missing"}
            ],
        )
    return body
