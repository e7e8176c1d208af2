"""CPU time against wall-clock time, over a sliding window: the figures on the page.

CPU time is a process's user + system time from psutil: its reading now less the reading
sampled, once a second, at the window's start. Parley's own process and the embedded
model's process (when one runs) are measured apart. The wall-clock figure is the
turn-seconds that fell inside the window: the integral over the window of the number of
turns running, so a turn still being written counts for the part of it that has run, and
a turn that began before the window counts for its part inside. ``turn_started`` and
``turn_ended`` (called by the turn's workflow) mark a turn's span.

The meter keeps ``history`` seconds of samples, from which ``series`` draws the page's
chart: the same three figures per bucket of time over the last minutes.

The figures are the whole service's: every Parley process sharing the database (each
worker of each replica). Every ``publish_interval`` seconds (``idle_publish_interval``
while it is idle), and at a clean shutdown, each process writes one row to
``usage_samples``: what it measured since its previous row (its own CPU seconds, the
model's or null, the turn-seconds accrued in the period, turns still running included,
and the number of turns that finished), under a random id of its own. A row's time is
the database's clock, never a host's, so the hosts' clocks need not agree; windows and
buckets are measured back from the database's "now" too.
``service_snapshot`` and ``service_series`` add the others' rows in the window (or per
bucket) to the process's own figures, which it measures itself, live and exactly as
above: with one process the figures are the same as without the table. A process that
died keeps counting with what it had written, until that leaves the window. The others'
part is seen a few seconds late (a row's period) and is cached ``cache_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psutil
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from parley.store import db_epoch, metadata, upsert_insert

logger = logging.getLogger("parley.usage")

# One row per process per period; each holds what the process measured since its row
# before (``seq`` - 1), so the sum of a process's rows over a span is its use in the span.
usage_samples = sa.Table(
    "usage_samples",
    metadata,
    sa.Column("process_id", sa.String(32), nullable=False),
    sa.Column("seq", sa.Integer(), nullable=False),
    # Seconds since the epoch, by the database's clock.
    sa.Column("at", sa.Float(), nullable=False),
    sa.Column("cpu_time", sa.Float(), nullable=False),
    sa.Column("model_cpu_time", sa.Float(), nullable=True),  # null: no embedded model
    sa.Column("wall_clock_time", sa.Float(), nullable=False),
    sa.Column("turns", sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint("process_id", "seq"),
    sa.Index("ix_usage_samples_at", "at"),
)

# A process deletes the rows older than the history every this many rows it writes.
_PRUNE_EVERY = 30
# How long a stopping process may wait for the database to take its last row.
_LAST_WRITE_SECONDS = 3.0
# CPU seconds since its last row that make a process write at ``publish_interval``.
_BUSY_CPU_SECONDS = 0.05


def _floor(value: sa.ColumnElement[float], dialect: str) -> sa.ColumnElement[Any]:
    # SQLite's floor() needs its math functions compiled in; a cast truncates, which is
    # the floor for the values at hand (never negative, once clamped).
    if dialect == "postgresql":
        return sa.func.floor(value)
    return sa.cast(value, sa.Integer)


def _add(a: float | None, b: float | None) -> float | None:
    """Two model CPU figures added; null only when neither process has a model."""
    return None if a is None and b is None else (a or 0.0) + (b or 0.0)


@dataclass(frozen=True, slots=True)
class Bucket:
    seconds_ago: float  # when the bucket ends, counted back from now
    cpu_time: float
    model_cpu_time: float | None
    wall_clock_time: float


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_time: float
    model_cpu_time: float | None
    wall_clock_time: float
    turns: int
    window_seconds: float


@dataclass(frozen=True, slots=True)
class _Reading:
    """A process's counters since its meter started."""

    own_cpu: float
    model_cpu: float
    turn_seconds: float
    turns: int


_NOTHING = Usage(0.0, None, 0.0, 0, 0.0)


class UsageMeter:
    def __init__(
        self,
        window: float = 60.0,
        interval: float = 1.0,
        history: float = 600.0,
        publish_interval: float = 2.0,
        idle_publish_interval: float = 5.0,
        cache_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.interval = interval
        self.history = max(history, window)
        self.publish_interval = publish_interval
        self.idle_publish_interval = max(idle_publish_interval, publish_interval)
        self.cache_seconds = cache_seconds
        # The clock of samples and turns (a test's own, to count exactly).
        self._clock = clock
        # Cumulative CPU seconds of the embedded model's processes, when there is one.
        self.model_cpu: Callable[[], float] | None = None
        self._start()

    def _start(self) -> None:
        self._process = psutil.Process()
        self.process_id = uuid.uuid4().hex
        self._samples: deque[tuple[float, float, float]] = deque()
        # Turns running (id: start), and the spans (start, end) of turns that ended within
        # the history, oldest end first.
        self._running: dict[str, float] = {}
        self._turns: deque[tuple[float, float]] = deque()
        # Since the meter started: the seconds of the turns that ended, and their number.
        self._turn_seconds = 0.0
        self._turn_count = 0
        # Publishing: what the last row written (or being written) counted up to.
        self._engine: AsyncEngine | None = None
        self._published = _Reading(self._own_cpu(), 0.0, 0.0, 0)
        self._pending: dict[str, Any] | None = None
        self._seq = 0
        self._publishing = asyncio.Lock()
        self._reading = asyncio.Lock()
        self._cache: dict[tuple[Any, ...], tuple[float, Any]] = {}
        self._failing: set[str] = set()
        self.sample()

    def _own_cpu(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    def _model_cpu(self) -> float:
        return self.model_cpu() if self.model_cpu is not None else 0.0

    def sample(self) -> None:
        now = self._clock()
        self._samples.append((now, self._own_cpu(), self._model_cpu()))
        # Keep one sample at or before the history's start, to measure from it.
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.history:
            self._samples.popleft()
        while self._turns and self._turns[0][1] < now - self.history:
            self._turns.popleft()

    # --- Turns ---------------------------------------------------------------------------

    def turn_started(self, turn_id: str) -> None:
        """A turn began running here (again, if it had: its first start stands)."""
        self._running.setdefault(turn_id, self._clock())

    def turn_ended(self, turn_id: str) -> None:
        """A turn stopped running here, however it ended."""
        start = self._running.pop(turn_id, None)
        if start is not None:
            self._ended(start, self._clock())

    def record_turn(self, seconds: float) -> None:
        """A turn of ``seconds`` that ended now."""
        now = self._clock()
        self._ended(now - seconds, now)

    def _ended(self, start: float, end: float) -> None:
        self._turns.append((start, end))
        self._turn_seconds += end - start
        self._turn_count += 1

    def _turn_seconds_in(self, edges: list[float], now: float) -> list[float]:
        """The turn-seconds that fell in each span between ``edges`` (ascending, equally
        spaced): each turn's time inside the span, a running turn's up to ``now``."""
        out = [0.0] * (len(edges) - 1)
        first, last = edges[0], edges[-1]
        width = (last - first) / len(out)
        for start, end in [*self._turns, *((began, now) for began in self._running.values())]:
            start, end = max(start, first), min(end, last)
            if end <= start or width <= 0:
                continue
            # The spans the turn touches (one more each side, for rounding), each its part.
            low = max(0, int((start - first) / width) - 1)
            high = min(len(out), int((end - first) / width) + 2)
            for k in range(low, high):
                out[k] += max(0.0, min(end, edges[k + 1]) - max(start, edges[k]))
        return out

    def _accrued(self, now: float) -> float:
        """Every turn's seconds since the meter started, running turns' up to ``now``."""
        return self._turn_seconds + sum(now - began for began in self._running.values())

    def snapshot(self) -> Usage:
        """This process's figures over the window."""
        now = self._clock()
        _, own_start, model_start = self._sample_at(now - self.window)
        return Usage(
            cpu_time=max(0.0, self._own_cpu() - own_start),
            model_cpu_time=(
                max(0.0, self._model_cpu() - model_start) if self.model_cpu is not None else None
            ),
            wall_clock_time=self._turn_seconds_in([now - self.window, now], now)[0],
            turns=sum(1 for _, end in self._turns if end >= now - self.window),
            window_seconds=self.window,
        )

    def series(self, bucket_seconds: float = 10.0, buckets: int = 30) -> list[Bucket]:
        """This process's figures per bucket of ``bucket_seconds``, oldest first, ending now."""
        now = self._clock()
        edges = [now - bucket_seconds * k for k in range(buckets, -1, -1)]
        readings = [self._sample_at(edge) for edge in edges[:-1]]
        readings.append((now, self._own_cpu(), self._model_cpu()))
        walls = self._turn_seconds_in(edges, now)
        out = []
        for (_, own_a, model_a), (_, own_b, model_b), edge, wall in zip(
            readings, readings[1:], edges[1:], walls, strict=False
        ):
            out.append(
                Bucket(
                    seconds_ago=round(now - edge, 3),
                    cpu_time=max(0.0, own_b - own_a),
                    model_cpu_time=(
                        max(0.0, model_b - model_a) if self.model_cpu is not None else None
                    ),
                    wall_clock_time=wall,
                )
            )
        return out

    def _sample_at(self, moment: float) -> tuple[float, float, float]:
        """The first sample at or after ``moment`` (the oldest one if none is)."""
        return next((s for s in self._samples if s[0] >= moment), self._samples[-1])

    async def run(self) -> None:
        """Sample every ``interval`` and, once shared, publish every ``publish_interval``
        (every ``idle_publish_interval`` while the process is idle)."""
        last_published = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            self.sample()
            if self._engine is None:
                continue
            since = time.monotonic() - last_published + self.interval / 2
            if since >= self.idle_publish_interval or (
                since >= self.publish_interval and self._busy()
            ):
                last_published = time.monotonic()
                # Shielded: cancelled at shutdown, the write still ends (see ``close``).
                await asyncio.shield(self.publish())

    # --- Across processes ----------------------------------------------------------------

    def share(self, engine: AsyncEngine) -> None:
        """Publish this process's figures to ``engine`` and count the other processes'."""
        if self._process.pid != os.getpid():  # made before a fork: measure this process
            self._start()
        self._engine = engine

    async def close(self) -> None:
        """At a clean shutdown: write what was measured since the last row (unless the
        database does not answer within a few seconds), then stop."""
        if self._engine is not None:
            try:
                async with asyncio.timeout(_LAST_WRITE_SECONDS):
                    await self.publish()
            except TimeoutError:
                logger.warning("could not write this process's last usage figures in time")
            self._engine = None

    def _busy(self) -> bool:
        """Whether a turn ran, or some CPU was spent, since the last row: an idle process
        writes less often (its idle CPU waits a few seconds more to be counted)."""
        now, last = self._reading_now(), self._published
        spent = now.own_cpu - last.own_cpu + now.model_cpu - last.model_cpu
        ran = now.turns != last.turns or now.turn_seconds > last.turn_seconds
        return ran or spent >= _BUSY_CPU_SECONDS

    def _reading_now(self) -> _Reading:
        return _Reading(
            self._own_cpu(), self._model_cpu(), self._accrued(self._clock()), self._turn_count
        )

    async def publish(self) -> None:
        """Write one row: what this process measured since its last row.

        A row that could not be written is written again next time, as it was (a write
        that went through but whose answer was lost is not counted twice: its key is
        taken), and the next row counts everything since.
        """
        engine = self._engine
        if engine is None:
            return
        async with self._publishing:
            if self._pending is None:
                now, last = self._reading_now(), self._published
                self._seq += 1
                self._pending = {
                    "process_id": self.process_id,
                    "seq": self._seq,
                    "cpu_time": max(0.0, now.own_cpu - last.own_cpu),
                    "model_cpu_time": (
                        max(0.0, now.model_cpu - last.model_cpu)
                        if self.model_cpu is not None
                        else None
                    ),
                    "wall_clock_time": max(0.0, now.turn_seconds - last.turn_seconds),
                    "turns": now.turns - last.turns,
                }
                self._published = now
            dialect = engine.dialect.name
            insert = upsert_insert(dialect)(usage_samples)
            try:
                async with engine.begin() as conn:
                    row = insert.values(**self._pending, at=db_epoch(dialect))
                    await conn.execute(row.on_conflict_do_nothing())
            except Exception as error:  # the database is away: the next period tries again
                self._warn("publish", "could not write this process's usage figures: %s", error)
                return
            self._failing.discard("publish")
            seq, self._pending = self._pending["seq"], None
            if seq % _PRUNE_EVERY == 1:
                await self._prune(engine)

    async def _prune(self, engine: AsyncEngine) -> None:
        dialect = engine.dialect.name
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    usage_samples.delete().where(
                        usage_samples.c.at < db_epoch(dialect) - self.history
                    )
                )
        except Exception as error:
            self._warn("prune", "could not delete old usage figures: %s", error)

    def _warn(self, what: str, message: str, error: Exception) -> None:
        """Log a failure once, until the same thing succeeds again."""
        if what not in self._failing:
            self._failing.add(what)
            logger.warning(message, error)

    async def _others(
        self, key: tuple[Any, ...], query: Callable[[AsyncConnection, str], Awaitable[Any]]
    ) -> Any:
        """The other processes' part of a figure, from the database; cached briefly, so that
        many pages polling at once cost one query a period. None when there is no
        database, or it cannot be read (then the process's own figures are shown)."""
        engine = self._engine
        if engine is None:
            return None
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        async with self._reading:
            cached = self._cache.get(key)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            try:
                async with engine.connect() as conn:
                    value = await query(conn, engine.dialect.name)
                self._failing.discard("read")
            except Exception as error:
                self._warn("read", "could not read the other processes' usage figures: %s", error)
                value = None
            self._cache[key] = (time.monotonic() + self.cache_seconds, value)
            return value

    def _of_others(self, since: sa.ColumnElement[float]) -> sa.ColumnElement[bool]:
        return sa.and_(usage_samples.c.at > since, usage_samples.c.process_id != self.process_id)

    async def service_snapshot(self) -> Usage:
        """The whole service's figures over the window: this process's, live, and the
        others' as they last wrote them."""
        own = self.snapshot()
        window = self.window

        async def query(conn: AsyncConnection, dialect: str) -> Usage:
            c = usage_samples.c
            row = (
                await conn.execute(
                    sa.select(
                        sa.func.coalesce(sa.func.sum(c.cpu_time), 0.0),
                        sa.func.sum(c.model_cpu_time),
                        sa.func.coalesce(sa.func.sum(c.wall_clock_time), 0.0),
                        sa.func.coalesce(sa.func.sum(c.turns), 0),
                    ).where(self._of_others(db_epoch(dialect) - window))
                )
            ).one()
            model = None if row[1] is None else float(row[1])
            return Usage(float(row[0]), model, float(row[2]), int(row[3]), window)

        others: Usage = await self._others(("window", window), query) or _NOTHING
        return Usage(
            cpu_time=own.cpu_time + others.cpu_time,
            model_cpu_time=_add(own.model_cpu_time, others.model_cpu_time),
            wall_clock_time=own.wall_clock_time + others.wall_clock_time,
            turns=own.turns + others.turns,
            window_seconds=own.window_seconds,
        )

    async def service_series(self, bucket_seconds: float = 10.0, buckets: int = 30) -> list[Bucket]:
        """The whole service's figures per bucket, oldest first, ending now."""
        own = self.series(bucket_seconds, buckets)

        async def query(
            conn: AsyncConnection, dialect: str
        ) -> dict[int, tuple[float, float | None, float]]:
            c = usage_samples.c
            now = db_epoch(dialect)
            ago = _floor((now - c.at) / bucket_seconds, dialect).label("ago")
            rows = await conn.execute(
                sa.select(
                    ago,
                    sa.func.sum(c.cpu_time),
                    sa.func.sum(c.model_cpu_time),
                    sa.func.sum(c.wall_clock_time),
                )
                .where(self._of_others(now - bucket_seconds * buckets))
                .group_by(ago)
            )
            out: dict[int, tuple[float, float | None, float]] = {}
            for k, cpu, model, wall in rows:
                k = min(buckets - 1, max(0, int(k)))  # a row written as the query ran: now
                had = out.get(k, (0.0, None, 0.0))
                out[k] = (
                    had[0] + float(cpu or 0.0),
                    _add(had[1], None if model is None else float(model)),
                    had[2] + float(wall or 0.0),
                )
            return out

        others = await self._others(("series", bucket_seconds, buckets), query) or {}
        # Once any process has a model, every bucket has a model figure (0 when idle).
        no_model = 0.0 if any(model is not None for _, model, _ in others.values()) else None
        out = []
        for i, bucket in enumerate(own):
            cpu, model, wall = others.get(buckets - 1 - i, (0.0, None, 0.0))
            out.append(
                Bucket(
                    seconds_ago=bucket.seconds_ago,
                    cpu_time=bucket.cpu_time + cpu,
                    model_cpu_time=_add(_add(bucket.model_cpu_time, model), no_model),
                    wall_clock_time=bucket.wall_clock_time + wall,
                )
            )
        return out
