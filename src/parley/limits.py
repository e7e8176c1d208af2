"""Rate limits counted in the database, so that they hold across replicas and under any
number of requests at once.

A limit is a key (``"sign-in:address:203.0.113.7"``), a number of events and a window in
seconds. ``take`` counts one event for the key inside the caller's open transaction, in
one conditional upsert: on PostgreSQL its row lock makes concurrent callers of one key
wait for each other's commit, and on SQLite the write that opens the transaction takes
the database's write lock. Either way, of N requests at once exactly ``limit`` pass.

The window is fixed: it starts at the first event and lasts ``seconds``; the first event
after it starts a new one. Rolling back the caller's transaction undoes the count, and
``give_back`` undoes one that turned out not to count (a successful sign-in).
"""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from parley.store import metadata, upsert_insert

log = logging.getLogger(__name__)

KEY_MAX_CHARS = 200
# Rows untouched for this long are deleted now and then; no window may be longer.
LONGEST_WINDOW = timedelta(days=1)
# Every this many ``take`` calls a process prunes up to ``_PRUNE_BATCH`` expired rows, in
# a transaction of its own: more than ``take`` can add in between, so the table stays
# about as large as the set of keys seen in the last day.
_PRUNE_EVERY = 250
_PRUNE_BATCH = 1000

rate_limits = sa.Table(
    "rate_limits",
    metadata,
    sa.Column("key", sa.String(KEY_MAX_CHARS), primary_key=True),
    sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
    sa.Column("count", sa.Integer(), nullable=False),
)


class Limited(Exception):
    """The key's window is full; ``retry_after`` is the seconds until it ends."""

    def __init__(self, key: str, retry_after: float) -> None:
        super().__init__(f"{key}: try again in {retry_after:.1f} s")
        self.key = key
        self.retry_after = retry_after

    @property
    def retry_after_header(self) -> str:
        """``retry_after`` as a ``Retry-After`` value: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after)))


def _utc(moment: datetime) -> datetime:
    # SQLite gives back the naive UTC time it was given.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


async def take(
    conn: AsyncConnection, key: str, limit: int, seconds: float, now: datetime | None = None
) -> None:
    """Count one event for ``key`` in the caller's transaction, or raise ``Limited`` (and
    count nothing) when its window already holds ``limit`` events.

    On SQLite the driver begins the transaction only at its first write, so reads made
    before ``take`` are not part of it: call ``take`` first when what the transaction
    reads next must be decided under the write lock it takes.
    """
    if len(key) > KEY_MAX_CHARS:
        raise ValueError(f"a rate-limit key has at most {KEY_MAX_CHARS} characters")
    if not 0 < seconds <= LONGEST_WINDOW.total_seconds():
        raise ValueError(f"a window lasts more than 0 s and at most {LONGEST_WINDOW}")
    now = _utc(now or datetime.now(UTC))
    table = rate_limits.c
    expired = table.window_start <= now - timedelta(seconds=seconds)
    insert = upsert_insert(conn.dialect.name)(rate_limits)
    statement = (
        insert.values(key=key, window_start=now, count=1)
        .on_conflict_do_update(
            index_elements=[table.key],
            set_={
                "window_start": sa.case(
                    (expired, sa.literal(now, table.window_start.type)), else_=table.window_start
                ),
                "count": sa.case((expired, 1), else_=table.count + 1),
            },
            # A full window updates nothing (PostgreSQL still locks the row) and returns
            # no row.
            where=sa.or_(expired, table.count < limit),
        )
        .returning(table.count)
    )
    counted = (await conn.execute(statement)).scalar_one_or_none()
    _now_and_then(conn.engine)
    if counted is None:
        start = await conn.scalar(sa.select(table.window_start).where(table.key == key))
        ends = _utc(start) + timedelta(seconds=seconds) if start is not None else now
        # ``now`` was read before this transaction waited for the row's lock; a take that
        # read it later may have opened the window meanwhile. Never past one window.
        raise Limited(key, min(float(seconds), max(0.0, (ends - now).total_seconds())))


async def give_back(conn: AsyncConnection, key: str) -> None:
    """Undo one event counted for ``key`` (never below zero)."""
    await conn.execute(
        rate_limits.update()
        .where(rate_limits.c.key == key, rate_limits.c.count > 0)
        .values(count=rate_limits.c.count - 1)
    )


async def prune(engine: AsyncEngine, now: datetime | None = None) -> int:
    """Delete up to ``_PRUNE_BATCH`` rows untouched for ``LONGEST_WINDOW``; how many went.

    One statement in a transaction of its own, which waits for no row lock on PostgreSQL
    (rows in use are skipped), so it cannot take part in a deadlock.
    """
    cutoff = _utc(now or datetime.now(UTC)) - LONGEST_WINDOW
    stale = (
        sa.select(rate_limits.c.key)
        .where(rate_limits.c.window_start < cutoff)
        .limit(_PRUNE_BATCH)
        .with_for_update(skip_locked=True)
    )
    async with engine.begin() as conn:
        result = await conn.execute(
            rate_limits.delete().where(rate_limits.c.key.in_(stale.scalar_subquery()))
        )
    return int(result.rowcount or 0)


_calls = 0
_pruning: set[asyncio.Task[None]] = set()


def _now_and_then(engine: AsyncEngine) -> None:
    global _calls
    _calls += 1
    if _calls % _PRUNE_EVERY:
        return
    task = asyncio.get_running_loop().create_task(_prune_quietly(engine))
    _pruning.add(task)
    task.add_done_callback(_pruning.discard)


async def _prune_quietly(engine: AsyncEngine) -> None:
    try:
        await prune(engine)
    except Exception as error:  # the next prune will do; nothing waits on this one
        log.debug("pruning rate_limits failed: %r", error)
