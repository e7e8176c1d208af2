"""The DBOS chatbot example's API, kept exactly so its clients work unchanged."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from parley import turns
from parley.api.conversations import turn_for, within_limits
from parley.api.identity import SeedCaller
from parley.api.validation import (
    Username,
    UsernamePath,
    check_idempotency_key,
    check_message,
)
from parley.store import ConversationBusy, seed_conversation_id

router = APIRouter(tags=["chat"])


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message: StrictStr = Field(description="What the user says.")
    username: Username


class ChatMessage(BaseModel):
    content: str
    isUser: bool


class Times(BaseModel):
    cpu_time: float = Field(description="CPU seconds Parley's process used in the window.")
    model_cpu_time: float | None = Field(
        description="CPU seconds the embedded model's process used in the window "
        "(null when the model is a remote provider)."
    )
    wall_clock_time: float = Field(description="Seconds the turns finished in the window took.")
    turns: int = Field(description="Turns finished in the window.")
    window_seconds: float


class ErrorBody(BaseModel):
    detail: str


@router.post(
    "/chat",
    response_model=ChatMessage,
    responses={
        422: {"description": "A field is missing, of the wrong type, empty or too long."},
        403: {"model": ErrorBody, "description": "Accounts mode: not the caller's name."},
        429: {"model": ErrorBody, "description": "Accounts mode: too many turns."},
        409: {"model": ErrorBody, "description": "An earlier turn still runs after a long wait."},
        502: {"model": ErrorBody, "description": "The model provider failed."},
    },
)
async def chat(
    body: ChatRequest,
    request: Request,
    caller: SeedCaller,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="Retrying with the same key returns the same turn instead of "
            "running a second one."
        ),
    ] = None,
) -> ChatMessage:
    """Run one durable chat turn and return the model's reply."""
    if caller is not None and body.username != caller:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="You may chat only as yourself.")
    check_message(body.message, request.app.state.settings.max_message_chars, ("body", "message"))
    check_idempotency_key(idempotency_key)
    conversation_id = seed_conversation_id(body.username)
    turn_id, new = await turn_for(body.username, idempotency_key, body.message, conversation_id)
    if caller is not None and new:
        await within_limits(caller)
    try:
        reply = await turns.run_turn(body.username, conversation_id, body.message, turn_id)
    except turns.TurnFailed as failure:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, detail=str(failure)) from None
    except ConversationBusy:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail="An earlier message of yours is still being answered."
        ) from None
    return ChatMessage(content=reply, isUser=False)


@router.get(
    "/history/{username}",
    response_model=list[ChatMessage],
    # The store hands over finished JSON; the declared model documents it.
    response_class=Response,
    responses={200: {"content": {"application/json": {}}}},
)
async def history(username: UsernamePath, caller: SeedCaller) -> Response:
    """The user's messages and the model's replies, oldest first."""
    if caller is not None and username != caller:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="That history is not yours.")
    body = await turns.services().store.history_json(seed_conversation_id(username))
    return Response(body, media_type="application/json")


@router.get("/times", response_model=Times)
async def times(request: Request) -> Times:
    """CPU time against wall-clock time over the last minute."""
    usage = request.app.state.usage.snapshot()
    return Times(
        cpu_time=usage.cpu_time,
        model_cpu_time=usage.model_cpu_time,
        wall_clock_time=usage.wall_clock_time,
        turns=usage.turns,
        window_seconds=usage.window_seconds,
    )
