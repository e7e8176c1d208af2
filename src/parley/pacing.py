"""Pacing the model provider: the limits Parley is told, and the ones it learns.

Providers limit requests in flight and requests per minute, and answer 429 above them.

**Limits Parley is told** (``PARLEY_LLM_CONCURRENCY``, ``PARLEY_LLM_REQUESTS_PER_MINUTE``):
every turn is started on the DBOS queue ``QUEUE`` rather than at once. DBOS keeps the
queue's limits in the database, across every process and replica: a turn starts only when
fewer than the limit of turns are running and fewer than the limit started in the last
minute, and waits, durably, until then. A crash loses no waiting turn, and DBOS's dequeue
hands each to exactly one process, so none runs twice. A running turn holds its place for
the whole of its model step, so the limit on turns is a limit on requests in flight.

**Fair between users**: the queue takes turns by priority, and a turn's priority is its
round: a user's unfinished turns are numbered 1, 2, 3... counting on from the lowest
round any unfinished turn holds (``Store.queue_round``). So the queue goes round-robin
over users with turns waiting, one turn of each a round, whatever the number of turns
each has queued; a user who arrives joins the round being served, and one user's burst
of forty never delays another user's single message behind more than the turns already
in that round.

**Limits it is not told** (or shared with other clients): a 429 closes this process's
gate to the provider for the ``Retry-After`` it gave, for every turn at once, instead of
each turn retrying on its own schedule (on PostgreSQL every other process's gate too, by
a notification); it also halves how many requests the gate lets out at once, which grows
again by one for each full width of requests answered. A turn refused with 429 asks
again when the gate opens, without using up one of its attempts, for up to
``PARLEY_LLM_TIMEOUT`` x ``PARLEY_LLM_ATTEMPTS`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import sqlalchemy as sa
from dbos import DBOS, Queue
from dbos._dbos import _get_dbos_instance as _dbos_instance

from parley import llm
from parley.config import Settings

logger = logging.getLogger("parley.pacing")

QUEUE = "parley-model"

# Without limits no turn is queued (only turns left queued by an earlier run with
# limits), so the queue is looked at rarely; with them, every
# ``PARLEY_LLM_QUEUE_POLL_SECONDS``.
IDLE_POLL_SECONDS = 2.0

# DBOS counts a minute's turn starts by the database's clock (to the second, on SQLite
# with Python 3.11), the provider counts requests as they reach it, and a request leaves
# some time after its turn starts: more when the process is busy (a burst arriving) than
# when it is not. The queue's minute is longer by that slack; the gate then holds each
# process to the provider's minute by the moments its requests actually leave.
MINUTE_SECONDS = 62.0
# The gate's minute: the provider's, plus the little a request takes to reach it.
SENT_MINUTE_SECONDS = 60.5

# After this long without a refusal, the gate opens fully again: the refusals were a
# passing squeeze (another client's burst), and narrowing for good would throttle chats
# the provider would take.
RECOVER_SECONDS = 60.0
# The pause after a 429 that gave no Retry-After.
DEFAULT_PAUSE = 1.0


def paced(settings: Settings) -> bool:
    """Whether turns go through the queue: some limit of the provider's is set."""
    return settings.llm_concurrency is not None or settings.llm_requests_per_minute is not None


_queue: Queue | None = None


async def open_queue(settings: Settings) -> None:
    """Declare the queue with this process's limits (the latest process with limits to
    start sets them for all: replicas must agree). A process without limits starts its
    turns at once, and leaves the queue as it is, for turns waiting there."""
    global _queue
    per_minute = settings.llm_requests_per_minute
    queue = await DBOS.register_queue_async(
        QUEUE,
        global_concurrency=settings.llm_concurrency,
        limiter={"limit": per_minute, "period": MINUTE_SECONDS} if per_minute else None,
        polling_interval_sec=(
            settings.llm_queue_poll_seconds if paced(settings) else IDLE_POLL_SECONDS
        ),
        # A process without limits leaves those of others as they are.
        on_conflict="always_update" if paced(settings) else "never_update",
    )
    _queue = queue if paced(settings) else None
    _gate.limit(settings.llm_concurrency, settings.llm_requests_per_minute)


def close() -> None:
    global _queue
    _queue = None
    _gate.announce = None


def queue() -> Queue | None:
    """The queue turns start on, or None when they start at once."""
    return _queue


# --- Where a queued turn stands -----------------------------------------------------------

# A queued turn's readers learn its place this often.
POSITION_SECONDS = 1.0


@dataclass(slots=True)
class _Snapshot:
    at: float
    places: dict[str, int]


class Positions:
    """The places of the turns waiting in the queue, read for all of this process's
    readers at once, at most every ``POSITION_SECONDS``."""

    def __init__(self) -> None:
        self._snapshot = _Snapshot(-math.inf, {})
        self._reading: asyncio.Task[_Snapshot] | None = None

    async def of(self, turn_id: str) -> int | None:
        """The turn's place in the queue (1: next to start), or None once it has left it
        (started, stopped, or never queued)."""
        snapshot = await self._fresh(POSITION_SECONDS)
        if turn_id in snapshot.places:
            return snapshot.places[turn_id]
        # Queued after the last reading, perhaps: behind every turn it saw, until the next
        # reading (a burst of new readers must not each cost a reading of the whole queue).
        status = await DBOS.get_workflow_status_async(turn_id)
        if status is None or status.status != "ENQUEUED":
            return None
        return len(snapshot.places) + 1

    async def _fresh(self, max_age: float) -> _Snapshot:
        if time.monotonic() - self._snapshot.at <= max_age:
            return self._snapshot
        if self._reading is None:
            self._reading = asyncio.create_task(self._read())
        reading = self._reading
        try:
            self._snapshot = await asyncio.shield(reading)
        finally:
            if reading.done():
                self._reading = None
        return self._snapshot

    async def _read(self) -> _Snapshot:
        at = time.monotonic()
        waiting = await DBOS.list_workflows_async(
            status="ENQUEUED",
            queue_name=QUEUE,
            load_input=False,
            load_output=False,
        )
        # The order DBOS starts them in: priority, then age.
        waiting.sort(key=lambda w: (w.priority or 0, w.created_at or 0))
        return _Snapshot(at, {w.workflow_id: place for place, w in enumerate(waiting, 1)})


positions = Positions()


async def cancel_queued(turn_ids: list[str]) -> set[str]:
    """Take turns out of the queue that are still waiting there; the ids that were.

    Only a turn that no process has started is cancelled: DBOS's own cancel would cancel
    a running one too, whose step could then be cut off between writing its reply and
    recording it. This is DBOS's cancel, in one statement, on the condition that DBOS's
    dequeue also checks, so exactly one of the two takes each turn.
    """
    if not turn_ids:
        return set()

    def cancel() -> set[str]:
        sys_db = _dbos_instance()._sys_db
        status = sys_db.tables.workflow_status
        with sys_db.engine.begin() as conn:
            now = sys_db._now_ms_sql()
            rows = conn.execute(
                sa.update(status)
                .where(status.c.workflow_uuid.in_(turn_ids), status.c.status == "ENQUEUED")
                .values(
                    status="CANCELLED",
                    owner_xid=None,
                    queue_name=None,
                    deduplication_id=None,
                    started_at_epoch_ms=None,
                    updated_at=now,
                    completed_at=now,
                )
                .returning(status.c.workflow_uuid)
            ).all()
        return {row[0] for row in rows}

    return await asyncio.to_thread(cancel)


# --- The gate: backing off when the provider refuses ---------------------------------------


class Gate:
    """How many model requests this process lets out at once, and when.

    Wide open until the provider first refuses one (429). Then closed, for every turn, for
    the pause the provider asked for, and narrowed to half the requests that were out;
    it widens again by one for each full width of requests answered (a slow probe for
    more), and opens fully after ``RECOVER_SECONDS`` without a refusal. It never widens
    past ``PARLEY_LLM_CONCURRENCY``, and lets out no more than
    ``PARLEY_LLM_REQUESTS_PER_MINUTE`` in any ``SENT_MINUTE_SECONDS``.
    """

    def __init__(self) -> None:
        self._most = math.inf
        self._per_minute: int | None = None
        self._sent: collections.deque[float] = collections.deque()
        self._width = math.inf
        self._out = 0
        self._closed_until = 0.0
        self._refused_at = -math.inf
        self._changed = asyncio.Condition()
        # Tells the other processes of a pause (``Store.announce_pause``).
        self.announce: Callable[[float], Awaitable[None]] | None = None

    def limit(self, most: int | None, per_minute: int | None = None) -> None:
        self._most = float(most) if most is not None else math.inf
        self._width = min(self._width, self._most)
        self._per_minute = per_minute

    def _rate_wait(self, now: float) -> float:
        """Seconds until the per-minute limit lets one more request out."""
        if self._per_minute is None:
            return 0.0
        while self._sent and self._sent[0] <= now - SENT_MINUTE_SECONDS:
            self._sent.popleft()
        if len(self._sent) < self._per_minute:
            return 0.0
        return self._sent[-self._per_minute] + SENT_MINUTE_SECONDS - now

    @property
    def width(self) -> float:
        return self._width

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        """Hold a place among the requests out for as long as the block lasts."""
        async with self._changed:
            while True:
                now = time.monotonic()
                if self._width < self._most and now - self._refused_at > RECOVER_SECONDS:
                    self._width = self._most
                wait = max(self._closed_until - now, self._rate_wait(now))
                if wait <= 0 and self._out < self._width:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait if wait > 0 else None)
            self._out += 1
            if self._per_minute is not None:
                self._sent.append(time.monotonic())
        try:
            yield
        finally:
            self._out -= 1
            async with self._changed:
                self._changed.notify(1)

    async def answered(self) -> None:
        if self._width >= self._most:
            return
        self._width = min(self._width + 1.0 / self._width, self._most)
        await self._wake()

    async def refused(self, pause: float) -> None:
        """The provider answered 429 and asked for ``pause`` seconds."""
        now = time.monotonic()
        self._refused_at = now
        first = now >= self._closed_until
        if first:
            # The first refusal of this pause; the others are requests that were already
            # out when it came, and say nothing new.
            self._width = max(1.0, min(self._width, float(self._out)) / 2)
            logger.warning(
                "the model provider is refusing requests (429): pausing %.1f s, then at "
                "most %d at once",
                pause,
                self._width,
            )
        self._closed_until = max(self._closed_until, now + pause)
        await self._wake()
        if first and self.announce is not None:
            try:
                await self.announce(pause)
            except Exception as error:  # the others learn from their own refusals
                logger.warning("could not tell the other processes of the pause: %s", error)

    def hold(self, pause: float) -> None:
        """Another process was refused and asked to pause: close for as long, without
        narrowing (this process's own requests were not refused). Requests waiting wake
        at their own time and find it closed longer."""
        if math.isfinite(pause) and pause > 0:
            longest = min(pause, llm.MAX_RETRY_AFTER)
            self._closed_until = max(self._closed_until, time.monotonic() + longest)

    async def _wake(self) -> None:
        # Waiters wake on their own when a pause ends; a change of width or of the pause
        # may let some out now, or keep them in longer.
        async with self._changed:
            self._changed.notify_all()


_gate = Gate()


def gate() -> Gate:
    return _gate
