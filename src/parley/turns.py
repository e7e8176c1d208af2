"""One chat turn as a DBOS durable workflow.

    request:   store the user's message and an empty reply "streaming"; start the workflow
    workflow:  one step: ask the model (through the memory graph), store the reply, and
               write the stream's end event

The request stores the user's message before the workflow starts, in the same transaction
that claims the conversation for this turn (and checks the user's limits), so a turn the
client was told about always has its message. After a crash DBOS runs the workflow again
under the same id: a finished step returns its recorded result instead of running, and an
unfinished one runs again. Running again is harmless: the graph's checkpoint holds the
model's reply from the moment the model finished, so the model is not asked twice, and
the store's writes are idempotent on the turn id. The reply is stored in the model's step
rather than a step of its own because each recorded step costs DBOS a check and a write.

No chat text goes into DBOS's workflow records: the workflow's inputs are the
conversation's id, its output and its step's output a status. The text is read from
Parley's tables, where deleting a conversation deletes it (the reply's pieces in the
turn's DBOS stream go with the turn's DBOS records: ``parley.deletion``).

A streaming turn also writes its reply, piece by piece, to its event stream
(``parley.streams``), from which any process can serve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import sqlalchemy as sa
from dbos import DBOS, SetEnqueueOptions, SetWorkflowID, StepOptions, WorkflowHandleAsync
from dbos import error as dbos_errors
from dbos._dbos import _get_dbos_instance as _dbos_instance
from dbos._utils import INTERNAL_QUEUE_NAME

from parley import llm, pacing, streams
from parley.config import Settings
from parley.memory import Memory, Reply, ReplySink, shown
from parley.store import (
    ConversationBusy,
    ConversationNotFound,
    KeyTaken,
    Message,
    Store,
    TurnContext,
    TurnLimits,
    is_transient,
)
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
    models: llm.Models
    # Returns while this process may still write its turns' results (``parley.cluster``).
    alive: Callable[[], Awaitable[None]]


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


# The version of the turn workflow (its inputs, its steps, and what a turn is), recorded
# by DBOS with every workflow: DBOS resumes after a crash, and dequeues, only the
# workflows of the version it runs. Releases that keep the workflow keep the number, so
# their turns resume across an upgrade; a change bumps it. Turns of the versions this
# one can finish are adopted (``adopt_turns``); turns of others are ended cleanly
# (``end_turns_of_other_versions``) rather than left pending for ever.
#
# "turns-3": a turn may be a regenerated reply, with no user message of its own, and its
# step reads the branch before it from the store. A "turns-2" release would run such a
# turn wrongly (from its checkpoint, or not at all), so it must not see them; its own
# turns, which this version reads as a conversation stored before branches, are adopted.
TURN_WORKFLOW_VERSION = "turns-3"
ADOPTED_VERSIONS = ("turns-2",)


def new_turn_id() -> str:
    """A turn's workflow id: random, so no later turn can ever be taken for it."""
    return f"turn-{uuid.uuid4()}"


def key_hash(idempotency_key: str) -> str:
    return hashlib.sha256(idempotency_key.encode()).hexdigest()


# The reply of each turn a request here waits for (``run_turn``), handed over by its
# workflow, so that the request need not read it back.
_replies: dict[str, Message | None] = {}


async def answer(conversation_id: str, turn_id: str, stream: bool) -> str:
    """The turn's step (run by ``chat_turn`` with retry options from the settings): the
    model's reply, stored, and for a streaming turn the stream's end event written; the
    reply's status."""
    parts = services()
    context = await parts.store.turn_context(turn_id, parts.settings.memory_max_messages)
    if context is None:
        # The conversation was deleted before the model was asked: nothing to answer.
        outcome: dict[str, Any] = {"text": "", "stopped": True, "tail": None}
    else:
        outcome = await ask_model(conversation_id, turn_id, context, stream)
    status = "stopped" if outcome["stopped"] else "complete"
    await services().alive()
    message = await store_reply(
        conversation_id, turn_id, outcome["text"], status, stream=stream, tail=outcome["tail"]
    )
    if turn_id in _replies:
        _replies[turn_id] = message
    return message.status if message is not None else "gone"


async def ask_model(
    conversation_id: str, turn_id: str, context: TurnContext, stream: bool
) -> dict[str, Any]:
    """The model's reply to the turn's message, through the conversation's memory, by
    the conversation's model and instructions.

    Each run of a streaming turn's model step is a new epoch of its event stream. The
    pieces not yet written to the durable stream come back as ``tail``: the end event
    carries them, which saves a write per turn.
    """
    parts = services()

    def ask(sink: ReplySink | None = None) -> Awaitable[Reply]:
        return parts.memory.reply(
            conversation_id,
            turn_id,
            context.prompt.content,
            history=shown(context.history),
            asked_in=context.prompt.turn_id,
            sink=sink,
            model=parts.models.client(context.model),
            system_prompt=context.system_prompt,
        )

    if not stream:
        try:
            reply = await _paced(turn_id, ask)
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
        reply = await _paced(turn_id, lambda: ask(writer))
    except llm.PROVIDER_ERRORS as error:
        await _before_retry(error)
        raise
    return {"text": reply.text, "stopped": reply.stopped, "tail": writer.tail()}


# When each turn in this process was first refused with 429, so that the step's retries
# share one time budget.
_refused_since: dict[str, float] = {}


async def _paced(turn_id: str, ask: Callable[[], Awaitable[Reply]]) -> Reply:
    """``ask()`` through the gate to the provider (``parley.pacing``); refused with 429,
    asked again when the gate opens, within the turn's time budget, without using up an
    attempt. Nothing was written of a refused reply, so asking again is asking anew."""
    gate = pacing.gate()
    settings = services().settings
    while True:
        async with gate.request():
            try:
                reply = await ask()
            except openai.RateLimitError as error:
                pause = llm.retry_after(error) or pacing.DEFAULT_PAUSE
                await gate.refused(pause)  # at most llm.MAX_RETRY_AFTER
                since = _refused_since.setdefault(turn_id, time.monotonic())
                if time.monotonic() + pause - since > settings.llm_timeout * settings.llm_attempts:
                    raise
                continue
        await gate.answered()
        _refused_since.pop(turn_id, None)
        return reply


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
) -> Message | None:
    """Store the final reply and, for a streaming turn, write the stream's end event; the
    reply as stored (None when its conversation was deleted).

    A reply that was already finished (by an earlier run of the step, or failed as an
    orphan) stays as it was, and the end event says so. Run again after a crash, the end
    event may be written twice; readers stop at the first, and both are the same.
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
        # after the deletion did; forget it again. Its text goes nowhere else.
        await parts.memory.delete(conversation_id)
        tail = None
    if stream:
        end = streams.terminal_id(message.epochs if message else 0)
        if message is not None and message.status == "failed":
            event = streams.Event(end, "error", {"detail": message.error})
        else:
            kind = "done" if message is not None and message.status == "complete" else "stopped"
            body = message_json(message) if message else None
            event = streams.Event(end, kind, {"message": body})
        await streams.finish(turn_id, event, tail)
    return message


@DBOS.step(**_DATABASE_RETRIES)
async def fail_turn(conversation_id: str, turn_id: str, error: str, stream: bool) -> None:
    """Drop the unanswered message from the model's memory; store the failure."""
    await services().alive()
    await services().memory.forget(conversation_id, turn_id)
    await store_reply(conversation_id, turn_id, "", "failed", error=error, stream=stream)


@DBOS.workflow()
async def chat_turn(conversation_id: str, stream: bool) -> dict[str, Any]:
    """One turn; its outcome: ``{"status", "error"}`` (the reply is in the store)."""
    turn_id = DBOS.workflow_id
    assert turn_id is not None
    started = time.monotonic()
    _running.add(turn_id)
    services().usage.turn_started(turn_id)
    _idle.clear()
    try:
        try:
            status = await DBOS.run_step_async(
                _answer_options(services().settings), answer, conversation_id, turn_id, stream
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
            return {"status": "failed", "error": detail}
        logger.info("turn %s in %.2f s", status, time.monotonic() - started)
        return {"status": status, "error": None}
    finally:
        _refused_since.pop(turn_id, None)
        turn_ended(turn_id)
        _running.discard(turn_id)
        if not _running:
            _idle.set()
        services().usage.turn_ended(turn_id)
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
        "parent_id": message.parent_id,
    }


# A reply "streaming" with no workflow behind it is taken for an orphan (its request died
# between storing it and starting the workflow) only when it is at least this old: a
# turn that another request has just begun has no workflow yet for a few milliseconds.
ORPHAN_AFTER_SECONDS = 30.0

# The turns this process is between storing and starting.
_starting: set[str] = set()


class KeyReused(Exception):
    """The idempotency key named a turn that asked for something else: another message,
    another conversation, an edit or a regeneration of another message."""


def request_digest(
    conversation_id: str,
    text: str,
    *,
    replaces: int | None = None,
    regenerates: int | None = None,
) -> str:
    """What a request that starts a turn asks for, as stored with its idempotency key."""
    if regenerates is not None:
        asked = ["regenerate", conversation_id, regenerates]
    else:
        asked = ["send", conversation_id, text, replaces]
    return hashlib.sha256(json.dumps(asked).encode()).hexdigest()


async def start_turn(
    owner: str,
    conversation_id: str,
    text: str,
    *,
    idempotency_key: str | None,
    stream: bool,
    create_conversation: bool = False,
    wait_if_busy: bool = False,
    limits: TurnLimits | None = None,
    replaces: int | None = None,
    regenerates: int | None = None,
) -> tuple[str, WorkflowHandleAsync[dict[str, Any]] | None]:
    """Store the user's message and start its workflow; the turn's id, and the handle of
    its workflow unless the turn had already ended.

    With ``replaces`` (a user message's id), the message is a new version of that one;
    with ``regenerates`` (a reply's id), the turn writes a new version of that reply, and
    ``text`` is not used (see ``Store.begin_turn``). With an idempotency key that already
    names a turn of ``owner``, that turn (started again if its request died before it
    could start it) instead. Raises ``KeyReused``, ``TooManyTurns`` (beyond ``limits``;
    a turn that already exists is not counted), ``ConversationNotFound``,
    ``MessageRefused``, or ``ConversationBusy`` while another reply is being written in
    the conversation (unless ``wait_if_busy``, which waits for it instead).
    """
    parts = services()
    store = parts.store
    hashed = key_hash(idempotency_key) if idempotency_key is not None else None
    request = request_digest(conversation_id, text, replaces=replaces, regenerates=regenerates)
    deadline = time.monotonic() + parts.settings.llm_timeout * parts.settings.llm_attempts
    while True:
        if hashed is not None and (earlier := await store.keyed_turn(owner, hashed)):
            if earlier.request is not None:
                reused = earlier.request != request
            else:  # stored before edits and regenerations: a new message, then
                reused = (
                    replaces is not None
                    or regenerates is not None
                    or earlier.text != text
                    or earlier.conversation_id != conversation_id
                )
            if reused:
                raise KeyReused(earlier.turn_id)
            if earlier.reply_status != "streaming":
                return earlier.turn_id, None
            return earlier.turn_id, await _start_workflow(
                earlier.turn_id, conversation_id, stream, owner=owner, new=False
            )
        turn_id = new_turn_id()
        try:
            await store.begin_turn(
                owner=owner,
                conversation_id=conversation_id,
                turn_id=turn_id,
                content=text,
                create_conversation=create_conversation,
                key_hash=hashed,
                request=request,
                limits=limits,
                replaces=replaces,
                regenerates=regenerates,
            )
        except KeyTaken:
            continue  # a request with the same key got there first: join its turn
        except ConversationBusy as busy:
            if await _is_orphan(busy):
                await store.fail_orphan(busy.turn_id, "The turn was interrupted.")
                continue
            if not wait_if_busy or time.monotonic() > deadline:
                raise
            await _wait_for(busy.turn_id)
            continue
        return turn_id, await _start_workflow(
            turn_id, conversation_id, stream, owner=owner, new=True
        )


async def _wait_for(turn_id: str) -> None:
    """Wait for the turn in the way to end; a moment, if it has no workflow (yet)."""
    status = await DBOS.get_workflow_status_async(turn_id) if turn_id else None
    if status is None:
        await asyncio.sleep(0.2)
        return
    await _until_ended(turn_id)


async def _is_orphan(busy: ConversationBusy) -> bool:
    """Whether the reply in the way will never be written: its request died before it
    started the workflow, or its workflow ended without writing it."""
    if not busy.turn_id:
        # It ended between the refusal and the look, or the conversation's deletion is
        # still being finished: just try again.
        return False
    if busy.turn_id in _starting:
        return False
    status = await DBOS.get_workflow_status_async(busy.turn_id)
    if status is not None:
        return status.status not in ("PENDING", "ENQUEUED")
    age = (datetime.now(UTC) - busy.since).total_seconds() if busy.since else 0.0
    return age > ORPHAN_AFTER_SECONDS


async def _start_workflow(
    turn_id: str, conversation_id: str, stream: bool, *, owner: str, new: bool
) -> WorkflowHandleAsync[dict[str, Any]]:
    """Start a stored turn's workflow (or join it, if it exists): at once, or, while the
    provider's limits are set, on their queue, in the owner's next round
    (``parley.pacing``).

    If it cannot be started, its readers here are told, and its reply is failed rather
    than left "being written" for ever.
    """
    queue = pacing.queue()
    if new and queue is None and stream:
        # It runs here: hand its readers here the live turn. (A queued turn runs in
        # whichever process starts it first; a workflow that exists already runs, or
        # ran, elsewhere.)
        streams.expect(turn_id)
    _starting.add(turn_id)
    try:
        if queue is not None:
            queue_round = await services().store.queue_round(turn_id, owner)
            with SetWorkflowID(turn_id), SetEnqueueOptions(priority=queue_round):
                return await queue.enqueue_async(chat_turn, conversation_id, stream)
        with SetWorkflowID(turn_id):
            return await DBOS.start_workflow_async(chat_turn, conversation_id, stream)
    except BaseException:
        streams.abandon(turn_id)
        with contextlib.suppress(Exception):  # the database may be what failed
            await services().store.fail_orphan(turn_id, "The turn could not be started.")
        raise
    finally:
        _starting.discard(turn_id)


async def run_turn(
    owner: str,
    conversation_id: str,
    text: str,
    *,
    idempotency_key: str | None,
    limits: TurnLimits | None = None,
) -> str:
    """The example's turn: run (or join) it and wait for its reply.

    Raises ``TurnFailed`` when the model could not answer, ``ConversationNotFound`` when
    the conversation was deleted before the reply was stored.
    """
    turn_id, handle = await start_turn(
        owner,
        conversation_id,
        text,
        idempotency_key=idempotency_key,
        stream=False,
        create_conversation=True,
        wait_if_busy=True,
        limits=limits,
    )
    reply: Message | None = None
    if handle is not None:
        _replies[turn_id] = None
        try:
            await _result(turn_id, handle)
            reply = _replies.get(turn_id)
        finally:
            _replies.pop(turn_id, None)
    if reply is None:  # answered elsewhere, or before: read it
        reply = await services().store.message(turn_id, "assistant")
    if reply is None:
        raise ConversationNotFound(conversation_id)
    if reply.status == "failed":
        raise TurnFailed(reply.error or "The turn failed.")
    return reply.content


# The turns that requests here wait for, each until it ends: set by the turn's workflow
# when it ends here. Held only while someone waits.
_ended: weakref.WeakValueDictionary[str, asyncio.Event] = weakref.WeakValueDictionary()


async def _until_ended(turn_id: str) -> None:
    """Wait until a turn's workflow has ended, or is gone (deleted with its conversation).

    A turn that runs here says so at once. One that may run elsewhere (queued, or in the
    way in its conversation) is looked at now and then as well: at once would cost a
    query a second per waiting request, and only PostgreSQL has other processes.
    """
    ended = _ended.get(turn_id)
    if ended is None:
        ended = _ended[turn_id] = asyncio.Event()
    every = 1.0 if services().settings.uses_postgres else 5.0
    while not ended.is_set():
        status = await DBOS.get_workflow_status_async(turn_id)
        if status is None or status.status not in ("PENDING", "ENQUEUED"):
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), every)


async def _result(turn_id: str, handle: WorkflowHandleAsync[dict[str, Any]]) -> None:
    """Wait for a turn's workflow to end: a turn started here, on its handle; a queued
    one, whose handle could only poll the database, as ``_until_ended`` does."""
    if pacing.queue() is None:
        await handle.get_result()
    else:
        await _until_ended(turn_id)


async def stop_queued(turn_id: str) -> bool:
    """Stop a turn still waiting in the queue: out of the queue, its reply stored as
    stopped with nothing written, the model never asked; whether it was waiting."""
    if turn_id not in await pacing.cancel_queued([turn_id]):
        return False
    await services().store.finish_reply(turn_id, content="", status="stopped")
    turn_ended(turn_id)
    return True


def turn_ended(turn_id: str) -> None:
    """Tell the requests here that wait for a turn that it has ended."""
    if (ended := _ended.get(turn_id)) is not None:
        ended.set()


async def end_turns_of_other_versions(
    executor_id: str, *, unless_run_by: frozenset[str] = frozenset()
) -> int:
    """End the turns ``executor_id`` left unfinished under another turn workflow version
    (unless a live process runs that version: ``unless_run_by``).

    DBOS resumes only the workflows of the version it runs, so after an upgrade that
    changed the workflow's shape, a turn the old version was writing when it stopped
    would stay "being written" for ever: its conversation busy, its readers waiting.
    Each is cancelled and its reply failed with a sentence that says why; the model's
    memory forgets the unanswered message. Returns how many there were.
    """
    parts = services()
    pending = await DBOS.list_workflows_async(
        status=["PENDING", "ENQUEUED"],
        executor_id=executor_id,
        workflow_id_prefix="turn-",
        load_input=False,
        load_output=False,
    )
    stale = [
        w.workflow_id
        for w in pending
        if w.app_version != TURN_WORKFLOW_VERSION and w.app_version not in unless_run_by
    ]
    for turn_id in stale:
        await DBOS.cancel_workflow_async(turn_id)
        turn = await parts.store.turn(turn_id)
        if turn is not None:
            await parts.memory.forget(turn.conversation_id, turn_id)
        await parts.store.fail_orphan(
            turn_id, "Parley was upgraded while this reply was being written; send it again."
        )
    if stale:
        logger.warning("ended %d turns left unfinished by another version of Parley", len(stale))
    return len(stale)


async def adopt_turns(executor_ids: list[str]) -> int:
    """Make the unfinished turns that ``executor_ids`` (stopped processes, or this one
    before it started) left under an adopted version (``ADOPTED_VERSIONS``) turns of this
    version, waiting to run: on DBOS's internal queue (as DBOS's recovery puts them), or
    where they were queued. How many there were.

    One conditional statement each, like DBOS's own recovery: a turn another process has
    recovered or started meanwhile is no longer pending here and is left alone.
    """
    if not executor_ids:
        return 0

    def adopt() -> int:
        sys_db = _dbos_instance()._sys_db
        status = sys_db.tables.workflow_status
        theirs = (
            status.c.executor_id.in_(executor_ids),
            status.c.application_version.in_(ADOPTED_VERSIONS),
            status.c.workflow_uuid.like("turn-%"),
        )
        with sys_db.engine.begin() as conn:
            now = sys_db._now_ms_sql()
            pending = conn.execute(
                sa.update(status)
                .where(*theirs, status.c.status == "PENDING")
                .values(
                    application_version=TURN_WORKFLOW_VERSION,
                    status="ENQUEUED",
                    owner_xid=None,
                    started_at_epoch_ms=None,
                    updated_at=now,
                    queue_name=sa.func.coalesce(status.c.queue_name, INTERNAL_QUEUE_NAME),
                )
            )
            queued = conn.execute(
                sa.update(status)
                .where(*theirs, status.c.status == "ENQUEUED")
                .values(application_version=TURN_WORKFLOW_VERSION, updated_at=now)
            )
        return pending.rowcount + queued.rowcount

    adopted = await asyncio.to_thread(adopt)
    if adopted:
        logger.warning("adopted %d turns of an earlier version of Parley", adopted)
    return adopted


async def take_over(executor_ids: list[str], live_versions: frozenset[str]) -> None:
    """Hand the pending turns of dead executors back to DBOS.

    DBOS puts each on its internal queue, from which exactly one live process (whichever
    dequeues it first) runs it again from its last recorded step; recovering an executor
    twice finds nothing left to requeue. Turns of an adopted version are adopted first;
    turns of another workflow version that no live process runs are ended
    (``end_turns_of_other_versions``).
    """
    await adopt_turns(executor_ids)
    await asyncio.to_thread(DBOS._recover_pending_workflows, executor_ids)
    for executor_id in executor_ids:
        await end_turns_of_other_versions(executor_id, unless_run_by=live_versions)


async def executors_with_old_turns(age_seconds: float) -> set[str]:
    """The executors with turns pending (by DBOS's record) for more than ``age_seconds``."""
    before = datetime.now(UTC) - timedelta(seconds=age_seconds)
    pending = await DBOS.list_workflows_async(
        status=["PENDING"],
        workflow_id_prefix="turn-",
        end_time=before.isoformat(),
        load_input=False,
        load_output=False,
    )
    return {w.executor_id for w in pending if w.executor_id}


def limits(settings: Settings) -> TurnLimits | None:
    """The per-user turn limits: accounts mode only (open mode has no users to limit)."""
    if settings.auth != "accounts":
        return None
    return TurnLimits(per_minute=settings.turns_per_minute, at_once=settings.concurrent_turns)
