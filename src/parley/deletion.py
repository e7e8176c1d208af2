"""Delete means gone: what a deleted conversation leaves outside Parley's own tables.

Deleting a conversation (or removing a user, which deletes all of theirs) is one
transaction on Parley's tables (``store.delete_conversations``). The same transaction
writes down what lies elsewhere: the conversation's id (its LangGraph thread: the model's
memory) and its turns' ids (their DBOS workflows: recorded steps and the reply's stream).
This module removes those and then the notes, so a crash at any point leaves the work to
the next pass, on any replica.

A turn still being written is first stopped (its rows are gone, so it stops at its next
piece or stop check) and removed once its workflow has ended: a running workflow would
write its records again after they were deleted.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dbos import DBOS

from parley import pacing, search, streams, turns
from parley.memory import Memory
from parley.store import Deleted, Store

logger = logging.getLogger("parley.deletion")

# How often every replica looks for deletions left to finish.
SWEEP_SECONDS = 5.0
# How long a deleting request waits for replies being written to stop before it answers.
WAIT_SECONDS = 5.0
# Workflow ids per DBOS call: a bounded statement, however many turns a chat had.
_BATCH = 500
_ACTIVE = ["PENDING", "ENQUEUED"]


async def finish_deleting(store: Store, memory: Memory, deleted: Deleted) -> bool:
    """After a deleting transaction: stop the replies of the deleted conversations that
    this process writes (the others learn it from their stop check, within
    ``PARLEY_STOP_POLL_SECONDS``), and remove what the conversations left elsewhere,
    waiting up to ``WAIT_SECONDS`` for their turns to stop; whether all is gone (the
    sweep finishes the rest)."""
    for turn_id in deleted.writing:
        streams.request_stop_here(turn_id)
    return await finish_soon(store, memory, deleted.conversation_ids, WAIT_SECONDS)


async def _clear(store: Store, memory: Memory, conversation_id: str) -> bool:
    """Remove a deleted conversation's memory and turns, if none of them still runs;
    whether they are all gone now (its to-do rows are kept for ``_done``)."""
    # The model's memory goes at once, whatever still runs (and again below, since a turn
    # that ends after this may write it again).
    await memory.delete(conversation_id)
    turn_ids = await store.deleted_turns(conversation_id)
    for start in range(0, len(turn_ids), _BATCH):
        batch = turn_ids[start : start + _BATCH]
        running = await DBOS.list_workflows_async(
            workflow_ids=batch, status=_ACTIVE, load_input=False, load_output=False
        )
        # A turn still waiting in the provider's queue (``parley.pacing``) is taken out
        # rather than waited for: it would not run before its place came. One that
        # started meanwhile is waited for like any other.
        queued = [w.workflow_id for w in running if w.status == "ENQUEUED"]
        cancelled = await pacing.cancel_queued(queued)
        for turn_id in cancelled:
            turns.turn_ended(turn_id)
        if len(cancelled) < len(running):
            return False
    # A turn that ended after its conversation was deleted may have written the memory
    # again (it deletes it again itself, but not across a crash).
    await memory.delete(conversation_id)
    for start in range(0, len(turn_ids), _BATCH):
        await DBOS.delete_workflows_async(turn_ids[start : start + _BATCH])
    return True


async def _done(store: Store, conversation_ids: list[str]) -> None:
    """These deletions are finished but for the search index: purge it (once for all of
    them, as it rewrites the whole index on SQLite), then drop their to-do rows. A crash
    before the end leaves the rows, and the next pass purges again."""
    if not conversation_ids:
        return
    await search.purge_deleted_words(store.engine)
    for conversation_id in conversation_ids:
        await store.forget_deletion(conversation_id)


async def finish_soon(
    store: Store, memory: Memory, conversation_ids: list[str], wait: float
) -> bool:
    """Finish these deletions, waiting up to ``wait`` seconds for their turns to stop;
    whether all are done (the sweep finishes the rest)."""
    deadline = time.monotonic() + wait
    left = list(conversation_ids)
    cleared: list[str] = []
    while left:
        now_cleared = [c for c in left if await _clear(store, memory, c)]
        cleared += now_cleared
        left = [c for c in left if c not in now_cleared]
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    await _done(store, cleared)
    return not left


async def sweep(store: Store, memory: Memory, every: float = SWEEP_SECONDS) -> None:
    """Finish, now and then, the deletions that nobody finished (a crash, a turn that
    took long to stop, a database that was away)."""
    while True:
        try:
            after = ""
            while page := await store.deletions(_BATCH, after):
                await _done(store, [c for c in page if await _clear(store, memory, c)])
                after = page[-1]
        except Exception as error:  # the database is away: look again next period
            logger.warning("could not finish deletions: %s", error)
        await asyncio.sleep(every)
