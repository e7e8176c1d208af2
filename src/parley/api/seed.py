"""The DBOS chatbot example's API, kept exactly so its clients work unchanged."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from parley import turns
from parley.accounts import Account
from parley.api.bodies import CheckedRoute
from parley.api.conversations import turn_refusals
from parley.api.identity import SeedCaller
from parley.api.validation import (
    NamePath,
    SignInName,
    StorableText,
    check_idempotency_key,
    check_message,
    open_mode_name,
    same_name,
)
from parley.store import ConversationBusy, ConversationNotFound, seed_conversation_id

router = APIRouter(tags=["chat"], route_class=CheckedRoute)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message: Annotated[StrictStr, StorableText] = Field(description="What the user says.")
    # Any name an account may sign in with; open mode checks it by the rules for new names.
    username: Annotated[SignInName, StorableText] = Field(
        description="The name the chat belongs to (1-64 characters, no control characters)."
    )


class ChatMessage(BaseModel):
    content: str
    isUser: bool


class Times(BaseModel):
    cpu_time: float = Field(
        description="CPU seconds Parley's processes (all of them) used in the window."
    )
    model_cpu_time: float | None = Field(
        description="CPU seconds the embedded model's processes used in the window "
        "(null when the model is a remote provider)."
    )
    wall_clock_time: float = Field(
        description="Turn-seconds in the window: the time each turn ran inside it, turns "
        "still running included."
    )
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
    if caller is not None and not same_name(body.username, caller.username):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="You may chat only as yourself.")
    settings = request.app.state.settings
    check_message(body.message, settings.max_message_chars, ("body", "message"))
    check_idempotency_key(idempotency_key)
    owner, conversation_id = _seed_conversation(body.username, caller, ("body", "username"))
    with turn_refusals():
        try:
            reply = await turns.run_turn(
                owner,
                conversation_id,
                body.message,
                idempotency_key=idempotency_key,
                limits=turns.limits(settings),
            )
        except turns.TurnFailed as failure:
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, detail=str(failure)) from None
        except ConversationBusy:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                detail="An earlier message of yours is still being answered.",
            ) from None
        except ConversationNotFound:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                detail="The conversation was deleted while the reply was being written.",
            ) from None
    return ChatMessage(content=reply, isUser=False)


def _seed_conversation(
    username: str, caller: Account | None, location: tuple[str, ...]
) -> tuple[str, str]:
    """Who owns the example's conversation of this name, and its id: the name's own in
    open mode; in accounts mode the account's, which no later account of the same name
    can reach."""
    if caller is None:
        name = open_mode_name(username, location)
        return name, seed_conversation_id(name)
    return caller.uid, caller.chat_conversation_id


@router.get(
    "/history/{username}",
    response_model=list[ChatMessage],
    # The store hands over finished JSON; the declared model documents it.
    response_class=Response,
    responses={200: {"content": {"application/json": {}}}},
)
async def history(username: NamePath, caller: SeedCaller) -> Response:
    """The user's messages and the model's replies, oldest first."""
    if caller is not None and not same_name(username, caller.username):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="That history is not yours.")
    _owner, conversation_id = _seed_conversation(username, caller, ("path", "username"))
    body = await turns.services().store.history_json(conversation_id)
    return Response(body, media_type="application/json")


@router.get("/times", response_model=Times)
async def times(request: Request) -> Times:
    """CPU time against wall-clock time over the last minute, of every Parley process
    sharing the database."""
    usage = await request.app.state.usage.service_snapshot()
    return Times(
        cpu_time=usage.cpu_time,
        model_cpu_time=usage.model_cpu_time,
        wall_clock_time=usage.wall_clock_time,
        turns=usage.turns,
        window_seconds=usage.window_seconds,
    )
