"""The processes of one Parley service, and how they cover for each other.

Every process (each worker of each replica) runs its turns as a DBOS executor with an id of
its own, ``NAME/SLOT``: NAME is the replica's (``PARLEY_EXECUTOR_ID``, by default the host
name) and SLOT the lowest number free on that replica. The ``executors`` table holds one
row per id with a random token and a heartbeat, in the database's own clock, so that the
hosts' clocks never matter.

- **Joining** claims a slot, atomically (a compare-and-set on the row's token): a slot is
  free when nobody holds it, when its holder on this host has exited, or when its
  heartbeat is older than the limit. A NAME held by a live process on another host is
  refused: two replicas must never share executor ids.
- **Heartbeat**: every ``dead_after / 6`` seconds each process renews its row, while its
  token is still there.
- **Taking over**: a row whose heartbeat is older than ``2/3 · dead_after`` belongs to a
  dead process. The first survivor to delete it (the same compare-and-set: only one can)
  asks DBOS to recover that executor's pending turns, which DBOS puts back on its internal
  queue; whichever process dequeues a turn first runs it, and DBOS's ownership token
  (``owner_xid``) keeps a second recovery, or the old process waking up, from recording
  anything for it. Pending turns of an executor with no row at all (a release older than
  this module, or a survivor that died between deleting a row and recovering its turns)
  are recovered once they are older than the same limit.
- **Fencing**: the turn's own writes outside DBOS (the model's memory above all) happen
  only while this process's lease holds: its last heartbeat began less than
  ``dead_after / 3`` ago. A process that finds its lease lapsed renews it first; if its
  row was taken over meanwhile (it was paused, or cut off from the database, for longer
  than the limit), its turns now belong to others and it exits at once rather than write
  them a second time. Its supervisor (or the worker pool) starts it again, afresh.

After a database outage every heartbeat is old at once: a process takes nothing over
until its own heartbeats have gone through for the whole limit again, so that the
processes that are still alive have had time to renew theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from parley.config import ConfigurationError, Settings
from parley.store import db_epoch, metadata

logger = logging.getLogger("parley.cluster")

executors = sa.Table(
    "executors",
    metadata,
    sa.Column("executor_id", sa.String(200), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=False),
    sa.Column("token", sa.String(64), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("started_at", sa.Float(), nullable=False),
    sa.Column("heartbeat_at", sa.Float(), nullable=False),
)

# The exit status of a process that found its turns taken over by others.
EXIT_TAKEN_OVER = 75


class ExecutorIdInUse(ConfigurationError):
    """Another live process holds the executor id this one was configured with."""


@dataclass(frozen=True, slots=True)
class Timing:
    """The heartbeat's periods, all derived from ``dead_after``: the longest a dead
    process's turns may wait before another process runs them."""

    dead_after: float

    @property
    def beat_every(self) -> float:
        return self.dead_after / 6

    @property
    def stale_after(self) -> float:
        """A heartbeat this old means a dead process (a beat, and some, before the limit:
        the survivors' own sweep comes at most one beat later)."""
        return self.dead_after * 2 / 3

    @property
    def lease(self) -> float:
        """How long after the start of its last heartbeat a process may write a turn's
        results without checking that the turn is still its own (half of
        ``stale_after``: the margin covers a slow beat and differing clock rates)."""
        return self.dead_after / 3


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is alive (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _exit_taken_over() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(EXIT_TAKEN_OVER)


def default_name() -> str:
    return socket.gethostname() or "parley"


def engine_for(settings: Settings, store_engine: AsyncEngine | None = None) -> AsyncEngine:
    """The heartbeat's database engine: on PostgreSQL a connection of its own, so that a
    busy pool never delays a heartbeat into a false death."""
    if not settings.uses_postgres and store_engine is not None:
        return store_engine
    if not settings.uses_postgres:
        return create_async_engine(settings.store_database_url())
    return create_async_engine(
        settings.store_database_url(),
        pool_size=1,
        max_overflow=0,
        pool_timeout=settings.db_timeout,
        connect_args={
            "server_settings": {"application_name": "parley-heartbeat"},
            "timeout": settings.db_timeout,
            "command_timeout": settings.db_statement_timeout,
        },
    )


def for_settings(
    settings: Settings, version: str, store_engine: AsyncEngine | None = None
) -> Cluster:
    return Cluster(
        engine_for(settings, store_engine),
        name=settings.executor_id or default_name(),
        version=version,
        dead_after=settings.dead_after_seconds,
        one_process=not settings.uses_postgres,
    )


async def check_free(settings: Settings, version: str) -> None:
    """``Cluster.check_free`` for ``parley serve``, before it starts any process."""
    cluster = for_settings(settings, version)
    try:
        await cluster.check_free()
    finally:
        await cluster.engine.dispose()


class Cluster:
    """This process's membership: its executor id, heartbeat, lease and takeovers."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        name: str,
        version: str,
        dead_after: float,
        one_process: bool,
        on_taken_over: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        # What to do on finding this process's turns taken over: exit, unless a test says.
        self._on_taken_over = on_taken_over or _exit_taken_over
        self.name = name
        self.version = version
        self.timing = Timing(dead_after)
        # SQLite: one process per data directory, so one slot.
        self.one_process = one_process
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.token = secrets.token_hex(16)
        self.executor_id = ""
        self._last_beat = 0.0  # monotonic time at which the last good heartbeat began
        self._connected_since: float | None = None
        self._left = False
        self._beating = asyncio.Lock()
        self._take_over: Callable[[list[str]], Awaitable[None]] | None = None
        self._orphans: Callable[[float], Awaitable[set[str]]] | None = None

    # --- Joining and leaving ----------------------------------------------------------

    async def join(self) -> str:
        """Claim this process's executor id (``NAME/SLOT``) and return it."""
        slot = 0
        while True:
            executor_id = f"{self.name}/{slot}"
            claimed = await self._claim(executor_id)
            if claimed:
                self.executor_id = executor_id
                self._last_beat = time.monotonic()
                self._connected_since = self._last_beat
                return executor_id
            if self.one_process:
                raise ExecutorIdInUse(
                    "another Parley process is serving this data directory; "
                    "SQLite serves one process at a time"
                )
            slot += 1

    async def _claim(self, executor_id: str) -> bool:
        """Take ``executor_id`` if it is free; whether this process now holds it."""
        now = db_epoch(self.engine.dialect.name)
        new_row = {
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "token": self.token,
            "version": self.version,
            "heartbeat_at": now,
        }
        while True:
            async with self.engine.begin() as conn:
                row = await self._row(conn, executor_id)
                if row is None:
                    try:
                        await conn.execute(
                            executors.insert().values(
                                executor_id=executor_id, started_at=now, **new_row
                            )
                        )
                    except sa.exc.IntegrityError:
                        continue  # another process claimed it at this moment: look again
                    return True
                if self._held(executor_id, row):
                    return False
                taken = await conn.execute(
                    executors.update()
                    .where(executors.c.executor_id == executor_id)
                    .where(executors.c.token == row.token)
                    .values(started_at=now, **new_row)
                )
                if taken.rowcount == 1:
                    return True
            # Its row changed between the look and the claim: look again.

    async def _row(self, conn: AsyncConnection, executor_id: str) -> sa.Row[Any] | None:
        """The holder of ``executor_id`` (host, pid, token) and its heartbeat's age."""
        now = db_epoch(self.engine.dialect.name)
        found = await conn.execute(
            sa.select(
                executors.c.host,
                executors.c.pid,
                executors.c.token,
                (now - executors.c.heartbeat_at).label("age"),
            ).where(executors.c.executor_id == executor_id)
        )
        return found.first()

    def _held(self, executor_id: str, row: sa.Row[Any]) -> bool:
        """Whether a live process of this replica holds the slot of ``row``; raises
        ``ExecutorIdInUse`` when one on another host does."""
        stale = row.age > self.timing.stale_after
        if row.host == self.host:
            return not stale and row.pid != self.pid and _pid_alive(row.pid)
        if not stale:
            raise ExecutorIdInUse(
                f"executor id {executor_id!r} is in use by a live process on host "
                f"{row.host!r} (its heartbeat is {row.age:.0f} s old): give each "
                "replica its own PARLEY_EXECUTOR_ID (by default its host name)"
            )
        return False

    async def check_free(self) -> None:
        """Before starting: raise ``ExecutorIdInUse`` if this replica's name is taken by
        a live process elsewhere, or (SQLite) its one slot by a live process here. The
        claim itself (``join``) decides; this is for a clear message at once."""
        executor_id = f"{self.name}/0"
        try:
            async with self.engine.connect() as conn:
                row = await self._row(conn, executor_id)
        except sa.exc.DBAPIError:
            return  # no table yet (a new database), or no database: join will tell
        if row is not None and self._held(executor_id, row) and self.one_process:
            raise ExecutorIdInUse(
                f"another Parley process (pid {row.pid}) is serving this data directory; "
                "SQLite serves one process at a time"
            )

    async def leave(self) -> None:
        """At a clean shutdown, once DBOS has stopped: let the other processes take over
        at once any turn left unfinished, rather than after the limit."""
        self._left = True
        if not self.executor_id:
            return
        with contextlib.suppress(Exception):  # the database may be what is going away
            async with self.engine.begin() as conn:
                await conn.execute(
                    executors.update()
                    .where(executors.c.executor_id == self.executor_id)
                    .where(executors.c.token == self.token)
                    .values(heartbeat_at=0.0)
                )

    # --- Heartbeat and lease ------------------------------------------------------------

    async def beat(self) -> bool:
        """Renew this process's heartbeat; False when its row was taken over."""
        started = time.monotonic()
        async with self.engine.begin() as conn:
            renewed = await conn.execute(
                executors.update()
                .where(executors.c.executor_id == self.executor_id)
                .where(executors.c.token == self.token)
                .values(heartbeat_at=db_epoch(self.engine.dialect.name))
            )
        if renewed.rowcount != 1:
            return False
        self._last_beat = max(self._last_beat, started)
        return True

    def lease_valid(self) -> bool:
        return not self._left and time.monotonic() - self._last_beat < self.timing.lease

    async def ensure_alive(self) -> None:
        """Return while this process may still write its turns' results; exit the process
        if they have been taken over. Free while the lease holds; one heartbeat (shared by
        every turn that asks at the same moment) when it has lapsed."""
        if self.lease_valid():
            return
        async with self._beating:
            if self.lease_valid():
                return
            if self._left or not await self.beat():
                self._taken_over()

    def _taken_over(self) -> None:
        if self._left:
            # Shutting down: the turns still running here are the others' to finish.
            raise asyncio.CancelledError("this process has left the cluster")
        logger.critical(
            "this process (executor %s) was taken for dead: it was paused or cut off from "
            "the database for longer than %.0f s, and other processes have taken over its "
            "turns; exiting so that none of them is written twice",
            self.executor_id,
            self.timing.stale_after,
        )
        self._on_taken_over()
        raise asyncio.CancelledError("this process's turns were taken over")

    # --- Taking over the dead ----------------------------------------------------------

    def cover_for_others(
        self,
        take_over: Callable[[list[str]], Awaitable[None]],
        orphans: Callable[[float], Awaitable[set[str]]],
    ) -> None:
        """From now on (DBOS runs), take over the turns of dead processes: ``take_over``
        recovers the pending turns of some executor ids; ``orphans(age)`` names the
        executors with turns pending for more than ``age`` seconds."""
        self._take_over = take_over
        self._orphans = orphans

    async def run(self) -> None:
        """Beat, and once ``cover_for_others`` was called take over the turns of dead
        processes, until cancelled. Started as soon as the id is claimed: a process that
        takes a while to start must not be taken for dead meanwhile."""
        beats = 0
        while True:
            await asyncio.sleep(self.timing.beat_every)
            try:
                async with self._beating:
                    alive = await self.beat()
            except Exception as error:  # the database is away: look again next beat
                logger.warning("could not renew this process's heartbeat: %s", error)
                self._connected_since = None
                continue
            if not alive:
                self._taken_over()
            now = time.monotonic()
            if self._connected_since is None:
                self._connected_since = now
            if self._take_over is None or self._orphans is None:
                continue
            if now - self._connected_since < self.timing.stale_after:
                continue  # just reconnected: the others may not have renewed theirs yet
            beats += 1
            try:
                if dead := await self.claim_dead():
                    logger.warning(
                        "taking over the turns of %d dead processes: %s",
                        len(dead),
                        ", ".join(sorted(dead)),
                    )
                    await self._take_over(dead)
                # The rarer case, pending turns with no row at all, once per limit.
                if beats % 6 == 0 and (strays := await self.rowless(self._orphans)):
                    logger.warning(
                        "taking over the turns of processes with no heartbeat: %s",
                        ", ".join(sorted(strays)),
                    )
                    await self._take_over(strays)
            except Exception as error:
                logger.warning("could not take over dead processes' turns: %s", error)

    async def claim_dead(self) -> list[str]:
        """Delete the rows of processes whose heartbeat is stale; the ids this process
        deleted, whose turns are now its to hand back to DBOS."""
        now = db_epoch(self.engine.dialect.name)
        claimed: list[str] = []
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    sa.select(executors.c.executor_id, executors.c.token)
                    .where(executors.c.heartbeat_at < now - self.timing.stale_after)
                    .where(executors.c.executor_id != self.executor_id)
                )
            ).all()
        for row in rows:
            async with self.engine.begin() as conn:
                deleted = await conn.execute(
                    executors.delete()
                    .where(executors.c.executor_id == row.executor_id)
                    .where(executors.c.token == row.token)
                    .where(executors.c.heartbeat_at < now - self.timing.stale_after)
                )
            if deleted.rowcount == 1:
                claimed.append(row.executor_id)
        return claimed

    async def rowless(self, orphans: Callable[[float], Awaitable[set[str]]]) -> list[str]:
        """Executors with turns pending for longer than the limit and no row at all."""
        candidates = await orphans(self.timing.stale_after)
        candidates.discard(self.executor_id)
        if not candidates:
            return []
        async with self.engine.connect() as conn:
            known = set(
                (
                    await conn.execute(
                        sa.select(executors.c.executor_id).where(
                            executors.c.executor_id.in_(sorted(candidates))
                        )
                    )
                ).scalars()
            )
        return sorted(candidates - known)

    async def live_versions(self) -> set[str]:
        """The turn workflow versions that live processes run."""
        now = db_epoch(self.engine.dialect.name)
        async with self.engine.connect() as conn:
            return set(
                (
                    await conn.execute(
                        sa.select(executors.c.version)
                        .where(executors.c.heartbeat_at >= now - self.timing.stale_after)
                        .distinct()
                    )
                ).scalars()
            )
