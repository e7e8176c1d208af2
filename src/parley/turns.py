"""One chat turn as a DBOS durable workflow.

    request:   store the user's message and an empty reply "streaming"; start the workflow
    workflow:  one step: ask the model (through the memory graph), store the reply, and
               write the stream's end event

The request stores the user's message before the workflow starts, in the same transaction
that claims the conversation for this turn, so a turn the client was told about always
has its message. After a crash DBOS runs the workflow again under the same id: a finished
step returns its recorded result instead of running, and an unfinished one runs again.
Running again is harmless: the graph's checkpoint holds the model's reply from the moment
the model finished, so the model is not asked twice, and the store's writes are
idempotent on the turn id. The reply is stored in the model's step rather than a step of
its own because each recorded step costs DBOS a check and a write, a tenth of a turn.

A streaming turn also writes its reply, piece by piece, to its event stream
(``parley.streams``), from which any process can serve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from dbos import DBOS, SetWorkflowID, StepOptions, WorkflowHandleAsync
from dbos import error as dbos_errors

from parley import llm, streams
from parley.config import Settings
from parley.memory import Memory
from parley.store import ConversationBusy, Message, Store, is_transient
from parley.usage import UsageMeter

logger = logging.getLogger("parley.turns")


class TurnFailed(Exception):
    """The turn could not get an answer; the message is fit to show a person."""


@dataclass(slots=True)
class Services:
    store: Store
    memory: Memory
    usage: UsageMeter
    settings: Settings


# Steps are module-level functions (DBOS finds them by name on recovery), so the services
# they use are installed here once at start-up by the app's lifespan.
_services: Services | None = None


# The turns this process is running, so that a shutdown can let them finish.
_running: set[str] = set()
_idle = asyncio.Event()
_idle.set()


async def drain(grace_seconds: float) -> None:
    """Wait up to ``grace_seconds`` for the turns in flight to finish."""
    if _running:
        logger.info("waiting up to %.0f s for %d turns to finish", grace_seconds, len(_running))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_idle.wait(), grace_seconds)
    if _running:
        logger.warning("%d turns will resume at the next start", len(_running))


def install(services: Services | None) -> None:
    global _services
    _services = services


def services() -> Services:
    if _services is None:
        raise RuntimeError("Parley's services are not running")
    return _services


_TURN_NAMESPACE = uuid.UUID("0f6c2a8e-9d41-4b1b-8f3e-5e7d2c9a4b60")


def new_turn_id(owner: str, idempotency_key: str | None = None) -> str:
    """The workflow id of a turn: random, or derived from the caller's idempotency key.

    The key is scoped to its owner, so two users choosing the same key get two turns.
    """
    if idempotency_key is None:
        return f"turn-{uuid.uuid4()}"
    return f"turn-{uuid.uuid5(_TURN_NAMESPACE, owner + chr(0) + idempotency_key)}"


async def answer(conversation_id: str, turn_id: str, text: str, stream: bool) -> dict[str, Any]:
    """The turn's step (run by ``chat_turn`` with retry options from the settings): the
    model's reply, stored, and for a streaming turn the stream's end event written; the
    reply's ``text`` and ``status``."""
    outcome = await ask_model(conversation_id, turn_id, text, stream)
    status = "stopped" if outcome["stopped"] else "complete"
    await store_reply(
        conversation_id, turn_id, outcome["text"], status, stream=stream, tail=outcome["tail"]
    )
    return {"text": outcome["text"], "status": status}


async def ask_model(conversation_id: str, turn_id: str, text: str, stream: bool) -> dict[str, Any]:
    """The model's reply to ``text``, through the conversation's memory.

    Each run of a streaming turn's model step is a new epoch of its event stream. The
    pieces not yet written to the durable stream come back as ``tail``: the end event
    carries them, which saves a write per turn.
    """
    parts = services()
    if not stream:
        try:
            reply = await parts.memory.reply(conversation_id, turn_id, text)
        except llm.PROVIDER_ERRORS as error:
            await _before_retry(error)
            raise
        return {"text": reply.text, "stopped": False, "tail": None}
    started = await parts.store.start_model_run(turn_id)
    settings = parts.settings
    writer = streams.TurnWriter(
        turn_id,
        started.epoch,
        flush_seconds=settings.stream_flush_seconds,
    )
    await writer.begin()
    if started.stop_requested or writer.stopped:
        # Stopped before this run began (perhaps before a crash): keep what the model's
        # memory already holds of the reply, and ask for nothing more. The epoch opened
        # with a reset, so it carries that text again.
        text_so_far = await parts.memory.reply_so_far(conversation_id, turn_id)
        if text_so_far:
            await writer.token(text_so_far)
        return {"text": text_so_far, "stopped": True, "tail": writer.tail()}
    try:
        reply = await parts.memory.reply(conversation_id, turn_id, text, sink=writer)
    except llm.PROVIDER_ERRORS as error:
        await _before_retry(error)
        raise
    return {"text": reply.text, "stopped": reply.stopped, "tail": writer.tail()}


async def _before_retry(error: BaseException) -> None:
    if llm.is_retryable(error):
        pause = llm.pause_before_retry(error, services().settings.llm_retry_interval)
        logger.warning("the model failed (%s); asking again in %.2f s", llm.describe(error), pause)
        await asyncio.sleep(pause)


def _answer_options(settings: Settings) -> StepOptions:
    return {
        "name": "answer",
        "retries_allowed": True,
        "max_attempts": settings.llm_attempts,
        "interval_seconds": settings.llm_retry_interval,
        "backoff_rate": 2.0,
        "should_retry": _worth_retrying,
    }


def _worth_retrying(error: BaseException) -> bool:
    return llm.is_retryable(error) or is_transient(error)


# The bookkeeping steps retry database hiccups (a restart, a locked file) for about a
# minute; a model step does so within its own attempts.
_DATABASE_RETRIES: StepOptions = {
    "retries_allowed": True,
    "max_attempts": 8,
    "interval_seconds": 0.5,
    "backoff_rate": 2.0,
    "should_retry": is_transient,
}


async def store_reply(
    conversation_id: str,
    turn_id: str,
    text: str,
    status: str,
    *,
    error: str | None = None,
    stream: bool = False,
    tail: dict[str, Any] | None = None,
) -> None:
    """Store the final reply and, for a streaming turn, write the stream's end event.

    Run again after a crash, the end event may be written twice; readers stop at the
    first, and both are the same.
    """
    parts = services()
    message = await parts.store.finish_reply(
        turn_id,
        content=text,
        status=status,  # type: ignore[arg-type]
        error=error,
    )
    if message is None:
        # Deleted while the model was writing: the graph may have written its memory
        # after the deletion did; forget it again.
        await parts.memory.delete(conversation_id)
    if not stream:
        return
    end = streams.terminal_id(message.epochs if message else 0)
    if status == "failed":
        event = streams.Event(end, "error", {"detail": error})
    else:
        kind = "done" if status == "complete" else "stopped"
        event = streams.Event(end, kind, {"message": message_json(message) if message else None})
    await streams.finish(turn_id, event, tail)


@DBOS.step(**_DATABASE_RETRIES)
async def fail_turn(conversation_id: str, turn_id: str, error: str, stream: bool) -> None:
    """Drop the unanswered message from the model's memory; store the failure."""
    await services().memory.forget(conversation_id, turn_id)
    await store_reply(conversation_id, turn_id, "", "failed", error=error, stream=stream)


@DBOS.workflow()
async def chat_turn(conversation_id: str, text: str, stream: bool) -> dict[str, Any]:
    """One turn; its outcome: ``{"status", "text", "error"}``."""
    turn_id = DBOS.workflow_id
    assert turn_id is not None
    started = time.monotonic()
    _running.add(turn_id)
    _idle.clear()
    try:
        try:
            outcome = await DBOS.run_step_async(
                _answer_options(services().settings),
                answer,
                conversation_id,
                turn_id,
                text,
                stream,
            )
        except (dbos_errors.DBOSMaxStepRetriesExceeded, *llm.PROVIDER_ERRORS) as error:
            if isinstance(error, dbos_errors.DBOSMaxStepRetriesExceeded) and error.errors:
                error = error.errors[-1]
            detail = (
                "The database was unavailable; try again."
                if is_transient(error)
                else llm.describe(error)
            )
            logger.warning("the turn failed: %s", detail)
            await fail_turn(conversation_id, turn_id, detail, stream)
            # A failed turn is an outcome, not a crash of the workflow.
            return {"status": "failed", "text": "", "error": detail}
        logger.info("turn %s in %.2f s", outcome["status"], time.monotonic() - started)
        return {"status": outcome["status"], "text": outcome["text"], "error": None}
    finally:
        _running.discard(turn_id)
        if not _running:
            _idle.set()
        services().usage.record_turn(time.monotonic() - started)
        streams.abandon(turn_id)


def message_json(message: Message) -> dict[str, Any]:
    """A message as the API shows it (in message lists and in a stream's final event)."""
    return {
        "id": message.id,
        "turn_id": message.turn_id,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        # As pydantic writes a UTC time, so both places show the same text.
        "created_at": message.created_at.isoformat().replace("+00:00", "Z"),
        "error": message.error,
    }


class TooManyTurns(Exception):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


async def check_turn_limits(owner: str) -> None:
    """Accounts mode: refuse a turn beyond the user's rate or concurrency limit."""
    settings = services().settings
    if settings.auth != "accounts":
        return
    since = datetime.now(UTC) - timedelta(minutes=1)
    recent, running = await services().store.turn_counts(owner, since)
    if running >= settings.concurrent_turns:
        raise TooManyTurns(
            f"At most {settings.concurrent_turns} replies may be written for you at once.", 5
        )
    if recent >= settings.turns_per_minute:
        raise TooManyTurns(f"At most {settings.turns_per_minute} messages a minute.", 60)


async def start_turn(
    owner: str,
    conversation_id: str,
    text: str,
    turn_id: str,
    *,
    stream: bool,
    create_conversation: bool = False,
    wait_if_busy: bool = False,
) -> WorkflowHandleAsync[dict[str, Any]]:
    """Store the user's message and start (or join, when ``turn_id`` exists) its workflow.

    Raises ``ConversationNotFound``, or ``ConversationBusy`` while another reply is being
    written in the conversation (unless ``wait_if_busy``, which waits for it instead).
    """
    store = services().store
    deadline = time.monotonic() + services().settings.llm_timeout * services().settings.llm_attempts
    while True:
        try:
            created = await store.begin_turn(
                owner=owner,
                conversation_id=conversation_id,
                turn_id=turn_id,
                content=text,
                create_conversation=create_conversation,
            )
            break
        except ConversationBusy as busy:
            status = await DBOS.get_workflow_status_async(busy.turn_id) if busy.turn_id else None
            if status is None or status.status not in ("PENDING", "ENQUEUED"):
                # Stored by a request that died before it could start the workflow, or
                # left by a workflow that ended abnormally: no reply will ever come, so
                # the conversation is not really busy.
                await store.fail_orphan(busy.turn_id, "The turn was interrupted.")
                continue
            if not wait_if_busy or time.monotonic() > deadline:
                raise
            with contextlib.suppress(Exception):  # its failure is its own client's news
                await (await DBOS.retrieve_workflow_async(busy.turn_id)).get_result()
    if stream and created:
        streams.expect(turn_id)
    with SetWorkflowID(turn_id):
        return await DBOS.start_workflow_async(chat_turn, conversation_id, text, stream)


async def run_turn(owner: str, conversation_id: str, text: str, turn_id: str) -> str:
    """The example's turn: run (or join) it and wait for its reply."""
    handle = await start_turn(
        owner,
        conversation_id,
        text,
        turn_id,
        stream=False,
        create_conversation=True,
        wait_if_busy=True,
    )
    outcome = await handle.get_result()
    if outcome["status"] == "failed":
        raise TurnFailed(outcome["error"])
    return str(outcome["text"])
