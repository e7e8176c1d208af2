"""One chat turn as a DBOS durable workflow.

store the user's message  ->  ask the model (through the memory graph)  ->  store the reply

Each arrow is a recorded step. After a crash DBOS runs the workflow again under the same
id: finished steps return their recorded results instead of running (so a recorded model
answer is never asked for again), and the writes are idempotent on the turn id, so a step
that did its write but died before DBOS recorded it stores nothing twice.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from dbos import DBOS, SetWorkflowID, StepOptions
from dbos import error as dbos_errors

from parley import llm
from parley.config import Settings
from parley.memory import Memory
from parley.store import Store
from parley.usage import UsageMeter


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


@DBOS.step()
async def save_user_message(owner: str, conversation_id: str, turn_id: str, text: str) -> None:
    await services().store.add_user_message(
        owner=owner, conversation_id=conversation_id, turn_id=turn_id, content=text
    )


async def ask_model(conversation_id: str, turn_id: str, text: str) -> str:
    """A step (run by ``chat_turn`` with retry options from the settings)."""
    return await services().memory.reply(conversation_id, turn_id, text)


def _ask_model_options(settings: Settings) -> StepOptions:
    return {
        "name": "ask_model",
        "retries_allowed": True,
        "max_attempts": settings.llm_attempts,
        "interval_seconds": settings.llm_retry_interval,
        "backoff_rate": 2.0,
        "should_retry": llm.is_retryable,
    }


@DBOS.step()
async def save_reply(conversation_id: str, turn_id: str, text: str) -> None:
    await services().store.add_reply(conversation_id=conversation_id, turn_id=turn_id, content=text)


@DBOS.step()
async def forget_failed_turn(conversation_id: str, turn_id: str) -> None:
    await services().memory.forget(conversation_id, turn_id)


@DBOS.workflow()
async def chat_turn(owner: str, conversation_id: str, text: str) -> str:
    turn_id = DBOS.workflow_id
    assert turn_id is not None
    started = time.monotonic()
    try:
        await save_user_message(owner, conversation_id, turn_id, text)
        try:
            reply = await DBOS.run_step_async(
                _ask_model_options(services().settings), ask_model, conversation_id, turn_id, text
            )
        except dbos_errors.DBOSMaxStepRetriesExceeded as error:
            await forget_failed_turn(conversation_id, turn_id)
            raise TurnFailed(llm.describe(error.errors[-1] if error.errors else error)) from None
        except llm.PROVIDER_ERRORS as error:  # an answer that asking again cannot change
            await forget_failed_turn(conversation_id, turn_id)
            raise TurnFailed(llm.describe(error)) from None
        await save_reply(conversation_id, turn_id, reply)
        return reply
    finally:
        services().usage.record_turn(time.monotonic() - started)


async def run_turn(owner: str, conversation_id: str, text: str, turn_id: str) -> str:
    """Run (or join, when ``turn_id`` already exists) a turn and wait for its reply."""
    with SetWorkflowID(turn_id):
        handle = await DBOS.start_workflow_async(chat_turn, owner, conversation_id, text)
    return await handle.get_result()
