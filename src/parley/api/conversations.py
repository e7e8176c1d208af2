"""Conversations, their messages, and turns whose replies stream (JSON under ``/api``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from dbos import DBOS
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi import status as http_status
from fastapi.responses import StreamingResponse
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from parley import deletion, pacing, streams, turns
from parley.api.bodies import CheckedRoute
from parley.api.identity import User
from parley.api.validation import (
    MAX_ID,
    Instant,
    StorableText,
    check_idempotency_key,
    check_message,
    invalid,
)
from parley.store import (
    MODEL_NAME_MAX_CHARS,
    TITLE_MAX_CHARS,
    Branch,
    ConversationBusy,
    ConversationNotFound,
    MessageRefused,
    TooManyTurns,
    Turn,
)

router = APIRouter(prefix="/api", route_class=CheckedRoute)

MESSAGES_PAGE = 50
MESSAGES_PAGE_MAX = 200
CONVERSATIONS_PAGE_MAX = 200


def _check_title(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty or only whitespace")
    if not value.isprintable():
        raise ValueError("must not contain control characters")
    return value


Title = Annotated[
    StrictStr,
    Field(min_length=1, max_length=TITLE_MAX_CHARS, description="1-200 characters."),
    StorableText,
    AfterValidator(_check_title),
]
ConversationId = Annotated[uuid.UUID, Path(description="The conversation's id.")]
TurnId = Annotated[
    str,
    Path(pattern=r"^turn-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"),
]


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: Title | None = None


class ConversationChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: Title | None = Field(default=None, description="A new title (not null).")
    model: Annotated[StrictStr, Field(min_length=1, max_length=MODEL_NAME_MAX_CHARS)] | None = (
        Field(
            default=None,
            description="The model its replies come from: a name from `GET /api/models`, "
            "or null for the default one.",
        )
    )
    system_prompt: Annotated[StrictStr, StorableText] | None = Field(
        default=None,
        description="Instructions the model is given before the conversation, up to the "
        "length of a message; null or empty for the default ones.",
    )


class ConversationOut(BaseModel):
    id: str
    title: str
    created_at: datetime
    updated_at: datetime
    model: str | None = Field(description="The model's name; null: the default model.")
    system_prompt: str | None = Field(description="The instructions; null: the default ones.")


class ConversationPage(BaseModel):
    conversations: list[ConversationOut]
    has_more: bool


class MessageOut(BaseModel):
    id: int
    turn_id: str
    role: Literal["user", "assistant"]
    content: str
    status: Literal["complete", "streaming", "stopped", "failed"]
    created_at: datetime
    error: str | None = Field(default=None, description="Why the reply failed, if it did.")
    parent_id: int | None = Field(
        default=None,
        description="The message before this one on its branch (null for the first).",
    )
    siblings: list[int] = Field(
        default_factory=list,
        description="The ids of every version of this message (edits of a message, "
        "regenerations of a reply), oldest first, its own included.",
    )


class MessagePage(BaseModel):
    messages: list[MessageOut] = Field(description="Oldest first.")
    has_more: bool = Field(description="Whether older messages exist (ask with `before`).")


class NewMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: Annotated[StrictStr, StorableText] = Field(description="What the user says.")
    replaces: Annotated[StrictInt, Field(ge=1, le=MAX_ID)] | None = Field(
        default=None,
        description="Edit and resend: the id of a user message of this conversation. The "
        "new message is another version of it, with a reply of its own; what followed "
        "the old version stays on its own branch.",
    )


class TurnStarted(BaseModel):
    turn_id: str
    stream_url: str


class TurnState(BaseModel):
    turn_id: str
    status: Literal["stopping", "complete", "stopped", "failed"]


class Problem(BaseModel):
    detail: str


NOT_FOUND = {404: {"model": Problem, "description": "No such conversation of yours."}}


def _not_found() -> HTTPException:
    return HTTPException(http_status.HTTP_404_NOT_FOUND, detail="No such conversation.")


def _conversation_out(conversation: Any) -> ConversationOut:
    return ConversationOut(
        id=conversation.id,
        title=conversation.title,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        model=conversation.model,
        system_prompt=conversation.system_prompt,
    )


# --- Conversations -------------------------------------------------------------------


@router.post(
    "/conversations",
    status_code=http_status.HTTP_201_CREATED,
    response_model=ConversationOut,
    tags=["conversations"],
)
async def create_conversation(
    user: User, request: Request, body: NewConversation | None = None
) -> ConversationOut:
    """Start a conversation. Without a title it is named after its first message."""
    store = turns.services().store
    accounts = request.app.state.settings.auth == "accounts"
    return _conversation_out(
        await store.create_conversation(user, body.title if body else None, account=accounts)
    )


@router.get("/conversations", response_model=ConversationPage, tags=["conversations"])
async def list_conversations(
    user: User,
    limit: Annotated[int, Query(ge=1, le=CONVERSATIONS_PAGE_MAX)] = 50,
    before: Annotated[
        Instant | None,
        Query(
            description="Only conversations last active before this time: the `updated_at` "
            "of the last conversation of the page before."
        ),
    ] = None,
    before_id: Annotated[
        uuid.UUID | None,
        Query(
            description="With `before`: the id of the last conversation of the page before, "
            "so that conversations active at the same moment are neither skipped nor repeated."
        ),
    ] = None,
) -> ConversationPage:
    """The caller's conversations, the most recently active first."""
    found = await turns.services().store.conversations(
        user,
        limit=limit + 1,
        before=before,
        before_id=str(before_id) if before_id is not None else None,
    )
    return ConversationPage(
        conversations=[_conversation_out(c) for c in found[:limit]], has_more=len(found) > limit
    )


@router.get(
    "/conversations/{conversation_id}",
    response_model=ConversationOut,
    responses=NOT_FOUND,
    tags=["conversations"],
)
async def get_conversation(user: User, conversation_id: ConversationId) -> ConversationOut:
    try:
        return _conversation_out(
            await turns.services().store.conversation(user, str(conversation_id))
        )
    except ConversationNotFound:
        raise _not_found() from None


@router.patch(
    "/conversations/{conversation_id}",
    response_model=ConversationOut,
    responses=NOT_FOUND,
    tags=["conversations"],
)
async def change_conversation(
    user: User, conversation_id: ConversationId, body: ConversationChange, request: Request
) -> ConversationOut:
    """Rename a conversation, or choose its model or its instructions: any of the three.
    The next reply uses them."""
    store = turns.services().store
    given = body.model_fields_set
    if not given:
        raise invalid(("body",), "give at least one of title, model and system_prompt")
    changes: dict[str, Any] = {}
    if "title" in given:
        if body.title is None:
            raise invalid(("body", "title"), "must be a title, not null")
        changes["title"] = body.title
    if "model" in given:
        names = request.app.state.models.names
        if body.model is not None and body.model not in names:
            raise invalid(
                ("body", "model"),
                "is not a model of this service (GET /api/models lists them)",
                "unknown_model",
            )
        changes["model"] = body.model
    if "system_prompt" in given:
        prompt = body.system_prompt
        limit = request.app.state.settings.max_message_chars
        if prompt is not None and len(prompt) > limit:
            raise invalid(
                ("body", "system_prompt"), f"must be at most {limit} characters", "string_too_long"
            )
        changes["system_prompt"] = prompt if prompt and prompt.strip() else None
    try:
        await store.update_conversation(user, str(conversation_id), **changes)
        return _conversation_out(await store.conversation(user, str(conversation_id)))
    except ConversationNotFound:
        raise _not_found() from None


@router.delete(
    "/conversations/{conversation_id}",
    status_code=http_status.HTTP_204_NO_CONTENT,
    responses=NOT_FOUND,
    tags=["conversations"],
)
async def delete_conversation(
    user: User, conversation_id: ConversationId, request: Request
) -> Response:
    """Delete a conversation: its messages, the model's memory of it, its turns' records,
    everything.

    A reply still being written is stopped. Everything is gone when the answer comes,
    unless a reply takes longer than a few seconds to stop: its remains go as soon as it
    has.
    """
    parts = turns.services()
    conversation = str(conversation_id)
    try:
        deleted = await parts.store.delete_conversation(user, conversation)
    except ConversationNotFound:
        raise _not_found() from None
    await deletion.finish_deleting(parts.store, parts.memory, deleted)
    return Response(status_code=http_status.HTTP_204_NO_CONTENT)


# --- Messages ------------------------------------------------------------------------


@router.get(
    "/conversations/{conversation_id}/messages",
    response_model=MessagePage,
    responses=NOT_FOUND,
    tags=["conversations"],
)
async def list_messages(
    user: User,
    conversation_id: ConversationId,
    limit: Annotated[int, Query(ge=1, le=MESSAGES_PAGE_MAX)] = MESSAGES_PAGE,
    before: Annotated[
        int | None,
        Query(
            ge=1,
            le=MAX_ID,
            description="Only the messages before this one (a message of this "
            "conversation), on its branch.",
        ),
    ] = None,
    leaf: Annotated[
        int | None,
        Query(
            ge=1,
            le=MAX_ID,
            description="Show the branch through this message of the conversation, "
            "continued to its newest versions below it, and make it the current one.",
        ),
    ] = None,
) -> MessagePage:
    """A page of the conversation's current branch: its latest messages, or those before
    ``before``. Each message names its ``parent_id`` and its ``siblings`` (its versions).

    A reply being written shows what it holds so far when this process is writing it, and
    is empty otherwise; its stream has all of it.
    """
    store = turns.services().store
    try:
        branch = await store.branch(
            user, str(conversation_id), limit=limit, before=before, leaf=leaf
        )
    except ConversationNotFound:
        raise _not_found() from None
    except MessageRefused as refusal:
        raise invalid(("query", refusal.field), refusal.reason) from None
    return MessagePage(messages=_messages_out(branch), has_more=branch.has_more)


def _messages_out(branch: Branch) -> list[MessageOut]:
    out = []
    for message in branch.messages:
        body = turns.message_json(message)
        if message.status == "streaming" and (live := streams.live_turn(message.turn_id)):
            body["content"] = live.text
        out.append(MessageOut(**body, siblings=branch.siblings.get(message.id, [message.id])))
    return out


TURN_REFUSALS: dict[int | str, dict[str, Any]] = {
    **NOT_FOUND,
    409: {"model": Problem, "description": "A reply is still being written here."},
    429: {"model": Problem, "description": "Beyond your limits (accounts mode)."},
}
IdempotencyKey = Annotated[
    str | None,
    Header(description="Sending again with the same key returns the same turn."),
]


@router.post(
    "/conversations/{conversation_id}/messages",
    status_code=http_status.HTTP_202_ACCEPTED,
    response_model=TurnStarted,
    responses={
        **TURN_REFUSALS,
        422: {
            "description": "Empty or too long, `replaces` not a message of yours in this "
            "conversation, or an idempotency key reused."
        },
    },
    tags=["conversations"],
)
async def send_message(
    user: User,
    conversation_id: ConversationId,
    body: NewMessage,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> TurnStarted:
    """Start a turn; its reply streams from ``stream_url``. With ``replaces``, the
    message is a new version of an earlier one of yours (edit and resend)."""
    settings = request.app.state.settings
    check_message(body.content, settings.max_message_chars, ("body", "content"))
    check_idempotency_key(idempotency_key)
    if body.replaces is not None:
        await _no_release_before_branches(request)
    try:
        return await _started(
            user, conversation_id, body.content, request, idempotency_key, replaces=body.replaces
        )
    except MessageRefused as refusal:
        raise invalid(("body", "replaces"), refusal.reason) from None


@router.post(
    "/conversations/{conversation_id}/messages/{message_id}/regenerate",
    status_code=http_status.HTTP_202_ACCEPTED,
    response_model=TurnStarted,
    responses={
        **TURN_REFUSALS,
        404: {"model": Problem, "description": "No such conversation or message of yours."},
        422: {"description": "Not a reply, or an idempotency key reused."},
    },
    tags=["conversations"],
)
async def regenerate(
    user: User,
    conversation_id: ConversationId,
    message_id: Annotated[int, Path(ge=1, le=MAX_ID, description="The reply's id.")],
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> TurnStarted:
    """Ask the model again for a reply: a turn like sending, whose reply is a new version
    of that one (the old one is kept, as a sibling), answering the same message, on the
    same branch. Its reply streams from ``stream_url``."""
    check_idempotency_key(idempotency_key)
    await _no_release_before_branches(request)
    try:
        return await _started(
            user, conversation_id, "", request, idempotency_key, regenerates=message_id
        )
    except MessageRefused as refusal:
        if refusal.missing:
            raise HTTPException(http_status.HTTP_404_NOT_FOUND, detail="No such message.") from None
        raise invalid(("path", "message_id"), refusal.reason) from None


async def _started(
    user: str,
    conversation_id: uuid.UUID,
    text: str,
    request: Request,
    idempotency_key: str | None,
    *,
    replaces: int | None = None,
    regenerates: int | None = None,
) -> TurnStarted:
    """Start a streamed turn (a new message, an edit or a regeneration: see
    ``turns.start_turn``), its refusals as HTTP errors."""
    with turn_refusals():
        turn_id, _handle = await turns.start_turn(
            user,
            str(conversation_id),
            text,
            idempotency_key=idempotency_key,
            stream=True,
            limits=turns.limits(request.app.state.settings),
            replaces=replaces,
            regenerates=regenerates,
        )
    return TurnStarted(turn_id=turn_id, stream_url=f"/api/turns/{turn_id}/stream")


async def _no_release_before_branches(request: Request) -> None:
    """Refuse to branch while a replica of a release before branches runs (a rolling
    upgrade): it stores messages in id order only, which in a conversation with branches
    would land outside them. A moment later, once it has stopped, the request works."""
    live = await request.app.state.cluster.live_versions()
    if live & set(turns.ADOPTED_VERSIONS):
        raise HTTPException(
            http_status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="Parley is being upgraded; editing and regenerating work again once "
            "it is done. Try again in a minute.",
            headers={"Retry-After": "30"},
        )


@contextlib.contextmanager
def turn_refusals() -> Iterator[None]:
    """The refusals every way of starting a turn shares, as HTTP errors: no such
    conversation (404), a reply still being written in it (409), an idempotency key
    reused for another request (422), and a user's limits (429)."""
    try:
        yield
    except ConversationNotFound:
        raise _not_found() from None
    except ConversationBusy:
        raise HTTPException(
            http_status.HTTP_409_CONFLICT,
            detail="A reply is still being written in this conversation; wait or stop it.",
        ) from None
    except turns.KeyReused:
        raise invalid(
            ("header", "Idempotency-Key"),
            "was already used for a different message",
            "idempotency_key_reused",
        ) from None
    except TooManyTurns as refusal:
        raise HTTPException(
            http_status.HTTP_429_TOO_MANY_REQUESTS,
            detail=str(refusal),
            headers={"Retry-After": str(max(1, math.ceil(refusal.retry_after)))},
        ) from None


# --- Turns ---------------------------------------------------------------------------


async def owned_turn(user: User, turn_id: TurnId) -> Turn:
    turn = await turns.services().store.turn(turn_id)
    if turn is None or turn.owner != user:
        raise HTTPException(http_status.HTTP_404_NOT_FOUND, detail="No such turn.")
    return turn


OwnedTurn = Annotated[Turn, Depends(owned_turn)]


def resume_point(
    last_event_id: Annotated[
        str | None,
        Header(description="The id of the last event received: continue after it."),
    ] = None,
    after: Annotated[
        str | None, Query(description="Same as Last-Event-ID, for clients that cannot set it.")
    ] = None,
) -> streams.EventId:
    for location, value in (("header", last_event_id), ("query", after)):
        if value:
            try:
                return streams.EventId.parse(value)
            except ValueError as error:
                name = "Last-Event-ID" if location == "header" else "after"
                raise invalid((location, name), str(error)) from None
    return streams.START


class EventStream(StreamingResponse):
    """Server-Sent Events that the route formats itself.

    Not FastAPI's ``EventSourceResponse``: with that, FastAPI passes every event through
    a producer task, two memory streams and a cancel scope for its keep-alive timer,
    about a sixth of a streamed turn's CPU (``bench/stream_load.py``). The frames are
    still FastAPI's own (``format_sse_event``), and so are the keep-alive comments.
    """

    media_type = "text/event-stream"


@router.get(
    "/turns/{turn_id}/stream",
    response_class=EventStream,
    responses={
        200: {"description": "Server-Sent Events: each with an id, an event type and JSON data."},
        # Spelled out: given as a model, its schema would be filed under the route's
        # media type, and a 404 is JSON.
        404: {
            "description": "No such turn of yours.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
        },
    },
    tags=["turns"],
)
async def stream_turn(
    turn: OwnedTurn, after: Annotated[streams.EventId, Depends(resume_point)]
) -> EventStream:
    """The turn's reply as Server-Sent Events.

    ``queued`` events (no id) say where a turn waiting for the provider's limits stands
    (``{"position": 1}`` is next); ``token`` events carry pieces of text; ``reset`` says
    the model is answering again and the text so far is void; the stream ends with
    ``done`` or ``stopped`` (the final message) or ``error`` (a sentence for a person).
    Reconnecting with ``Last-Event-ID`` (or ``?after=``) continues right after that
    event; a finished turn replays whole.
    """
    parts = turns.services()
    frames = _frames(turn, after)
    if turn.reply_status == "streaming" and streams.live_turn(turn.turn_id) is None:
        paced = pacing.queue() is not None
        if paced and (place := await pacing.positions.of(turn.turn_id)):
            frames = _queued_then(turn, after, place)
        elif not (paced and await _started_here(turn.turn_id)):
            # Another process writes this reply, and puts its pieces in the durable
            # stream as they come only while someone elsewhere follows it.
            await parts.store.follow_elsewhere(turn.turn_id)
    return EventStream(_with_pings(frames, parts.settings.stream_ping_seconds))


async def _queued_then(turn: Turn, after: streams.EventId, place: int) -> AsyncIterator[bytes]:
    """A queued turn's stream: ``queued`` events, each with the turn's place in the queue
    (1: next to start), whenever it changes; then, once the turn has started, its reply."""
    turn_id = turn.turn_id
    shown = None
    position: int | None = place
    while position is not None:
        if position != shown:
            shown = position
            yield format_sse_event(data_str=json.dumps({"position": position}), event="queued")
        if await streams.appearance(turn_id, pacing.POSITION_SECONDS):
            break  # it started here
        position = await pacing.positions.of(turn_id)
    if streams.live_turn(turn_id) is None and not await _started_here(turn_id):
        await turns.services().store.follow_elsewhere(turn_id)
    async for frame in _frames(turn, after):
        yield frame


async def _started_here(turn_id: str) -> bool:
    """Whether a queued turn that has left the queue runs in this process: it has a live
    turn here as soon as its model step begins."""
    status = await DBOS.get_workflow_status_async(turn_id)
    if status is None or status.status != "PENDING" or status.executor_id != DBOS.executor_id:
        return False
    return await streams.appearance(turn_id, 5.0)


def _frame(event: streams.Event) -> bytes:
    return format_sse_event(data_str=json.dumps(event.data), event=event.type, id=str(event.id))


async def _with_pings(frames: AsyncIterator[bytes], every: float) -> AsyncIterator[bytes]:
    """``frames``, with a comment whenever none came for ``every`` seconds."""
    following = asyncio.ensure_future(anext(frames))
    try:
        while True:
            # A wait that times out leaves the frame coming; a timeout around the
            # generator itself would cancel it.
            done, _ = await asyncio.wait((following,), timeout=every)
            if not done:
                yield KEEPALIVE_COMMENT
                continue
            try:
                frame = following.result()
            except StopAsyncIteration:
                return
            yield frame
            following = asyncio.ensure_future(anext(frames))
    finally:
        following.cancel()


async def _frames(turn: Turn, after: streams.EventId) -> AsyncIterator[bytes]:
    last = after
    async for event in streams.read(turn.turn_id, after):
        last = event.id
        yield _frame(event)
        if event.terminal:
            return
    # The stream ended without an end event: a turn answered without streaming (the
    # example's /chat), or one that ended abnormally. Its stored reply says how it stands.
    for event in await _from_stored_reply(turn.turn_id):
        if event.id > last:
            yield _frame(event)


async def _from_stored_reply(turn_id: str) -> list[streams.Event]:
    message = await turns.services().store.message(turn_id, "assistant")
    # After every id the turn's stream may have given (it ran ``epochs`` epochs), so that
    # a reader resuming from any of them gets the end.
    end = streams.terminal_id(max(message.epochs, 1) if message else 1)
    if message is None or message.status == "streaming":
        return [streams.Event(end, "error", {"detail": "The turn ended without a reply."})]
    if message.status == "failed":
        return [streams.Event(end, "error", {"detail": message.error or "The turn failed."})]
    events = []
    if message.content:
        events.append(streams.Event(streams.EventId(1, 1), "token", {"text": message.content}))
    kind = "done" if message.status == "complete" else "stopped"
    events.append(streams.Event(end, kind, {"message": turns.message_json(message)}))
    return events


@router.post(
    "/turns/{turn_id}/cancel",
    response_model=TurnState,
    responses={404: {"model": Problem, "description": "No such turn of yours."}},
    tags=["turns"],
)
async def cancel_turn(turn: OwnedTurn) -> TurnState:
    """Stop the reply. What was written is kept (status ``stopped``), and the model's
    memory holds the same text. Stopping a finished turn changes nothing."""
    if turn.reply_status != "streaming":
        return TurnState(turn_id=turn.turn_id, status=turn.reply_status)  # type: ignore[arg-type]
    await turns.services().store.request_stop(turn.turn_id)
    streams.request_stop_here(turn.turn_id)
    if await turns.stop_queued(turn.turn_id):
        return TurnState(turn_id=turn.turn_id, status="stopped")
    return TurnState(turn_id=turn.turn_id, status="stopping")
