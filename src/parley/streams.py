"""A turn's events: live to readers in this process, durable in a DBOS stream for all.

A streaming turn produces ``token`` events (pieces of the reply), perhaps a ``reset``
(the model is being asked again, so the text so far is void), and one terminal event:
``done``, ``error`` or ``stopped``.

Every event has an id ``EPOCH.N``. An epoch is one run of the model step: the first run is
epoch 1, and a retry or a re-run after a crash starts the next one, which opens with a
``reset``. Epochs come from a counter in the database, so ids never repeat, even for
tokens a client saw live that a crash kept from reaching the durable stream. Ids order as
``(epoch, n)``, which is what makes ``Last-Event-ID`` resumption exact: a reader sends
everything after the id it was given.

Two paths carry the events:

- **live**: the process running the model step hands each token to readers in the same
  process at once (``LiveTurn``);
- **durable**: the step writes the workflow's DBOS stream: the reset, then the end event
  carrying every piece not written before it. A reader that connects after the turn
  ended, or after a crash, reads this. While a reader in another process follows the
  reply, the step also appends the pieces as they come, at most one write per
  ``stream_flush_seconds`` (a frame: pieces held back by it go out when it ends, token or
  not). Pieces cost no write otherwise: stream writes were a third of a streamed turn's
  CPU, and a crash voids the pieces of its epoch anyway.

A reader takes what it needs from the durable stream (the epochs this process did not run)
and then follows the live turn, if this process runs it.

What other processes ask of a reply this one writes (a reader there follows it, or a
client there stops it) is a flag in the reply's row (``followed_elsewhere``,
``stop_requested``). On PostgreSQL, the request also sends a notification in the same
transaction, which every process hears at once (``listen``); ``watch_replies`` reads the
flags every ``stop_poll_seconds`` as well, for notifications lost while a listener
reconnects (and for SQLite, where there is one process and no notification).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from dbos import DBOS
from dbos import error as dbos_errors

from parley import pacing
from parley.store import REPLY_REQUESTS_CHANNEL

if TYPE_CHECKING:
    from parley.store import ReplyFlags

logger = logging.getLogger("parley.streams")

STREAM_KEY = "events"
# Readers get at most this many batches of a reply per second (25): smooth to the eye.
FRAME_SECONDS = 0.04

EventType = Literal["token", "reset", "done", "error", "stopped"]
TERMINAL: frozenset[str] = frozenset({"done", "error", "stopped"})

_EVENT_ID = re.compile(r"^(\d{1,9})\.(\d{1,9})$")


@dataclass(frozen=True, slots=True, order=True)
class EventId:
    epoch: int
    n: int

    def __str__(self) -> str:
        return f"{self.epoch}.{self.n}"

    @classmethod
    def parse(cls, text: str) -> EventId:
        match = _EVENT_ID.match(text.strip())
        if match is None:
            raise ValueError("must be an event id such as 1.7")
        return cls(int(match[1]), int(match[2]))


START = EventId(0, 0)


@dataclass(frozen=True, slots=True)
class Event:
    id: EventId
    type: EventType
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL


def merge(events: list[Event]) -> list[Event]:
    """Consecutive ``token`` events as one, under the last one's id.

    Nothing is lost or repeated: a reader that resumes after that id gets what follows it.
    """
    merged: list[Event] = []
    for event in events:
        if event.type == "token" and merged and merged[-1].type == "token":
            text = merged[-1].data["text"] + event.data["text"]
            merged[-1] = Event(event.id, "token", {"text": text})
        else:
            merged.append(event)
    return merged


def expand(value: dict[str, Any]) -> list[Event]:
    """The events in one durable stream value: a batch of tokens, perhaps followed by the
    end event (``end``), or one event."""
    epoch, n = value["epoch"], value["n"]
    if value["type"] != "token":
        return [Event(EventId(epoch, n), value["type"], value.get("data") or {})]
    events = [
        Event(EventId(epoch, n + offset), "token", {"text": text})
        for offset, text in enumerate(value["texts"])
    ]
    if "end" in value:
        events += expand(value["end"])
    return events


class LiveTurn:
    """The events of a turn that runs in this process, for this process's readers.

    It holds every event from the epoch it was opened in, so a reader that starts late
    still gets them all; readers wait on a wake-up that each new event replaces.
    """

    def __init__(self, turn_id: str, first_epoch: int | None = None) -> None:
        self.turn_id = turn_id
        # None until the model step begins: a turn is registered as it starts, so that
        # readers who connect before its first token wait here rather than poll.
        self.first_epoch = first_epoch
        self.events: list[Event] = []
        self.stop_requested = False
        self.followed_elsewhere = False
        # The writer of the current epoch, and the order of its durable writes: one at a
        # time, as they were taken, whichever task makes them.
        self.writer: TurnWriter | None = None
        self.writes = asyncio.Lock()
        self._wake = asyncio.Event()
        self._begun = asyncio.Event()
        if first_epoch is not None:
            self._begun.set()

    def begin(self, epoch: int) -> None:
        if self.first_epoch is None:
            self.first_epoch = epoch
            self._begun.set()

    async def begun(self) -> None:
        await self._begun.wait()

    def follow_elsewhere(self) -> None:
        """A reader in another process follows this turn: its pieces go to the durable
        stream from now on, those held so far at once."""
        self.followed_elsewhere = True
        if self.writer is not None:
            self.writer.flush_soon()

    @property
    def epoch_from(self) -> int:
        """The first epoch this process ran: the live turn holds every event from it on."""
        assert self.first_epoch is not None, "wait for begun() first"
        return self.first_epoch

    def publish(self, event: Event) -> None:
        self.begin(event.id.epoch)
        self.events.append(event)
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    @property
    def text(self) -> str:
        """The reply as written so far in the current epoch."""
        parts: list[str] = []
        for event in self.events:
            if event.type == "reset":
                parts.clear()
            elif event.type == "token":
                parts.append(event.data["text"])
        return "".join(parts)

    async def follow(self, after: EventId) -> AsyncIterator[Event]:
        """The events after ``after``.

        Pieces that pile up while the reader is busy arrive as one (see ``merge``), and a
        reader is sent at most one batch per ``FRAME_SECONDS``: a fast model costs each
        reader a bounded number of writes, and a slow reader costs less, not more. The
        first piece after a pause goes out at once.
        """
        index = 0
        sent = 0.0
        while True:
            pending = [event for event in self.events[index:] if event.id > after]
            index = len(self.events)
            for event in merge(pending):
                yield event
                if event.terminal:
                    return
            if pending:
                sent = time.monotonic()
            # Events published while the reader was busy sending are sent next, the end
            # event among them, before any waiting.
            if len(self.events) == index:
                if self.events and self.events[-1].terminal:
                    return  # it came at or before ``after``: nothing more to send
                await self._wake.wait()
            if (wait := FRAME_SECONDS - (time.monotonic() - sent)) > 0:
                await asyncio.sleep(wait)


_live: dict[str, LiveTurn] = {}


def live_turn(turn_id: str) -> LiveTurn | None:
    return _live.get(turn_id)


# Readers waiting for a turn to begin here that was not expected (a queued turn, which
# whichever process dequeues it first runs): held only while someone waits.
_arrivals: weakref.WeakValueDictionary[str, asyncio.Event] = weakref.WeakValueDictionary()


async def appearance(turn_id: str, within: float) -> bool:
    """Wait up to ``within`` seconds for a turn to begin in this process; whether it has."""
    if turn_id in _live:
        return True
    arrival = _arrivals.get(turn_id)
    if arrival is None:
        arrival = _arrivals[turn_id] = asyncio.Event()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(arrival.wait(), within)
    return turn_id in _live


def expect(turn_id: str) -> None:
    """Register a turn this process is about to run, before any reader can ask for it."""
    _live.setdefault(turn_id, LiveTurn(turn_id))


def abandon(turn_id: str) -> None:
    """End a turn's live readers if it ended without a terminal event (a bug, or shutdown)."""
    live = _live.pop(turn_id, None)
    if live is not None and not (live.events and live.events[-1].terminal):
        after = live.events[-1].id if live.events else START
        live.publish(
            Event(EventId(after.epoch + 1, 0), "error", {"detail": "The turn ended unexpectedly."})
        )


def asked_elsewhere(request: str, turn_id: str) -> None:
    """What another process asked of a reply, if this process writes it: ``stop`` it, or
    ``follow`` it (put its pieces in the durable stream for a reader there)."""
    if request == "pause":  # of the provider's requests, for seconds: ``parley.pacing``
        with contextlib.suppress(ValueError):
            pacing.gate().hold(float(turn_id))
        return
    live = _live.get(turn_id)
    if live is None:
        return
    if request == "stop":
        live.stop_requested = True
    elif request == "follow" and not live.followed_elsewhere:
        live.follow_elsewhere()


def request_stop_here(turn_id: str) -> bool:
    """Stop a turn if this process runs it; whether it does."""
    live = _live.get(turn_id)
    if live is None:
        return False
    live.stop_requested = True
    return True


@dataclass(slots=True)
class TurnWriter:
    """Writes one epoch of a turn's reply: live at once; durable at the end, or at most
    once a ``flush_seconds`` frame while it is followed elsewhere."""

    turn_id: str
    epoch: int
    flush_seconds: float
    live: LiveTurn = field(init=False)
    n: int = 0
    _batch: list[str] = field(default_factory=list)
    _batch_start: int = 1
    _last_flush: float = -math.inf
    # The next write of pieces, when the frame ends: a task of its own, so that the
    # model's pieces never wait for the database on their way to this process's readers.
    # It runs in the step's context (DBOS writes the stream as the step), and only while
    # the step lasts.
    _later: asyncio.Task[None] | None = None
    _step: int | None = field(init=False, default=None)
    _context: contextvars.Context = field(init=False)

    def __post_init__(self) -> None:
        self.live = _live.setdefault(self.turn_id, LiveTurn(self.turn_id))
        if (arrival := _arrivals.pop(self.turn_id, None)) is not None:
            arrival.set()
        self.live.begin(self.epoch)
        self.live.writer = self
        self._step = _current_step()
        self._context = contextvars.copy_context()

    @property
    def stopped(self) -> bool:
        return self.live.stop_requested

    async def begin(self) -> None:
        if self.epoch > 1:
            # Durable before any token of this epoch, so a reader that resumes from an id
            # in an earlier epoch always learns that its text was void.
            reset = Event(EventId(self.epoch, 0), "reset", {})
            async with self.live.writes:
                await DBOS.write_stream_async(STREAM_KEY, _value(reset))
            self.live.publish(reset)

    async def token(self, text: str) -> None:
        self.n += 1
        self.live.publish(Event(EventId(self.epoch, self.n), "token", {"text": text}))
        if not self._batch:
            self._batch_start = self.n
        self._batch.append(text)
        if self.live.followed_elsewhere:
            self.flush_soon()

    def _due_in(self) -> float:
        return self._last_flush + self.flush_seconds - time.monotonic()

    def flush_soon(self) -> None:
        """Write the pieces held to the durable stream when the current frame ends (at
        once if it has), whether or not another token comes by then."""
        if self._later is None and self._batch:
            self._later = asyncio.get_running_loop().create_task(
                self._flush_when_due(), context=self._context
            )

    async def _flush_when_due(self) -> None:
        wrote = False
        try:
            while (wait := self._due_in()) > 0:  # noqa: ASYNC110 (a deadline, not an event)
                await asyncio.sleep(wait)
            # Pieces that come while this waits for its turn to write go in the same write.
            async with _piece_writes, self.live.writes:
                # Not once the step has ended (a write then would be the workflow's, not
                # the step's), nor for an epoch that a retry has replaced.
                current = self.live.writer is self and self._step is not None
                if current and _current_step() == self._step:
                    self._last_flush = time.monotonic()
                    if (value := self.tail()) is not None:
                        try:
                            await DBOS.write_stream_async(STREAM_KEY, value)
                        except BaseException:
                            self._put_back(value)
                            raise
                        wrote = True
        except Exception as error:
            # The pieces were put back: the next write, or the end event, carries them.
            logger.warning("could not write a reply's pieces to its stream: %s", error)
        finally:
            self._later = None
        if wrote:
            self.flush_soon()  # the pieces that came while it wrote, if any

    def tail(self) -> dict[str, Any] | None:
        """The pieces not yet written to the durable stream, as one stream value."""
        if not self._batch:
            return None
        value = {"epoch": self.epoch, "n": self._batch_start, "type": "token", "texts": self._batch}
        self._batch = []
        return value

    def _put_back(self, value: dict[str, Any]) -> None:
        """Hold again the pieces of a write that failed, before any taken since."""
        self._batch = [*value["texts"], *self._batch]
        self._batch_start = value["n"]


# Writes of pieces under way at once in this process, for all its replies. Each holds one
# of DBOS's pooled connections while it lasts, which the turns' own steps need as well:
# with one write per reply under way, a hundred followed replies would keep every turn of
# the process waiting for a connection. Beyond this, pieces wait, and more go in each write.
_PIECE_WRITES_AT_ONCE = 4
_piece_writes = asyncio.Semaphore(_PIECE_WRITES_AT_ONCE)


def _current_step() -> int | None:
    """The id of the DBOS step running in this context, if any."""
    return DBOS.step_id


async def watch_replies(
    flags_among: Callable[[list[str]], Awaitable[ReplyFlags]], every: float
) -> None:
    """Learn, within ``every`` seconds, what other processes asked of the replies this
    one writes: to stop (or their conversation was deleted there), or to put their pieces
    in the durable stream for a reader there.

    A stop asked of this process acts at once; this is for the others. One query a period
    for all the replies being written, not one per reply: with a thousand at once, the
    per-reply queries alone would keep a core busy.
    """
    while True:
        await asyncio.sleep(every)
        writing = [turn_id for turn_id, live in _live.items() if not live.stop_requested]
        for start in range(0, len(writing), _WATCH_BATCH):
            try:
                flags = await flags_among(writing[start : start + _WATCH_BATCH])
            except Exception as error:  # the database is away: look again next period
                logger.warning("could not check for stop and follow requests: %s", error)
                break
            for turn_id in flags.stopped:
                if (live := _live.get(turn_id)) is not None:
                    live.stop_requested = True
            for turn_id in flags.followed:
                if (live := _live.get(turn_id)) is not None and not live.followed_elsewhere:
                    live.follow_elsewhere()


# Turn ids per query of ``watch_replies``: a bounded statement, whatever the load.
_WATCH_BATCH = 500


async def listen(
    conninfo: str, *, connect_timeout: float = 10.0, longest_pause: float = 5.0
) -> None:
    """Hear, at once, what other processes ask of the replies this one writes: the
    notifications ``Store.follow_elsewhere`` and ``Store.request_stop`` send on PostgreSQL
    (and ``Store.announce_pause``'s, of the provider's requests).

    One connection of its own (``conninfo``, a libpq URL), in autocommit, listening. When
    the database goes away it connects again, after a pause that doubles up to
    ``longest_pause``; what was asked meanwhile, ``watch_replies`` finds.
    """
    pause = _FIRST_PAUSE
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(
                conninfo,
                autocommit=True,
                application_name="parley-listen",
                connect_timeout=max(1, round(connect_timeout)),
                # A database that vanishes without closing the connection (its host
                # lost) is noticed within a minute or so, rather than never.
                keepalives=1,
                keepalives_idle=20,
                keepalives_interval=10,
                keepalives_count=3,
            )
            async with conn:
                await conn.execute(f"LISTEN {REPLY_REQUESTS_CHANNEL}")
                if pause > _FIRST_PAUSE:
                    logger.info("listening for stop and follow requests again")
                pause = _FIRST_PAUSE
                async for notice in conn.notifies():
                    request, _, turn_id = notice.payload.partition(" ")
                    asked_elsewhere(request, turn_id)
        except Exception as error:  # the database went away, or never came
            logger.warning(
                "not listening for stop and follow requests (%s); again in %.1f s",
                str(error).strip() or type(error).__name__,
                pause,
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, longest_pause)


_FIRST_PAUSE = 0.1


def _value(event: Event) -> dict[str, Any]:
    return {"epoch": event.id.epoch, "n": event.id.n, "type": event.type, "data": event.data}


def terminal_id(epochs: int) -> EventId:
    """The id of a turn's last event: after every token of every epoch it ran."""
    return EventId(epochs + 1, 0)


async def finish(turn_id: str, event: Event, tail: dict[str, Any] | None = None) -> None:
    """Write a turn's end event, after ``tail`` (its last unwritten pieces), in one write.

    While the reply is followed elsewhere, it waits for a write of pieces still under way,
    and carries those of one that failed (the writer holds them again).
    """
    live = _live.get(turn_id)
    writer = live.writer if live is not None and live.followed_elsewhere else None
    async with live.writes if live is not None else contextlib.nullcontext():
        if writer is not None and (held := writer.tail()):
            if tail is not None and held["n"] + len(held["texts"]) == tail["n"]:
                tail = {**tail, "n": held["n"], "texts": [*held["texts"], *tail["texts"]]}
            elif tail is None:
                tail = held
            else:
                await DBOS.write_stream_async(STREAM_KEY, held)
        value = _value(event)
        if tail is not None:
            value = {**tail, "end": value}
        await DBOS.write_stream_async(STREAM_KEY, value)
    live = _live.pop(turn_id, None)
    if live is not None:
        live.publish(event)


async def read(turn_id: str, after: EventId = START) -> AsyncIterator[Event]:
    """Every event of a turn after ``after``, in order, until its terminal event.

    Ends early, with no terminal event, when the turn never streamed (or ended without
    writing one).
    """
    live = await _live_turn(turn_id)
    if live is None or (live.epoch_from > 1 and after < EventId(live.epoch_from, 0)):
        # Earlier epochs than this process ran (or the whole turn, when this process
        # does not run it) come from the durable stream.
        async for value in _read_durable(turn_id):
            live = live or await _live_turn(turn_id)
            if live is not None and value[0].id.epoch >= live.epoch_from:
                break  # the live turn holds the rest, and holds it sooner
            for event in merge([event for event in value if event.id > after]):
                yield event
                after = event.id
                if event.terminal:
                    return
        else:
            # The durable stream ended without an end event. Unless this process has
            # just begun running the turn, the caller decides what that means.
            live = await _live_turn(turn_id)
            if live is None:
                return
    async for event in live.follow(after):
        yield event


async def _live_turn(turn_id: str) -> LiveTurn | None:
    live = _live.get(turn_id)
    if live is not None:
        await live.begun()
    return live


async def _read_durable(turn_id: str) -> AsyncIterator[list[Event]]:
    # The workflow is started right after its messages are stored; a reader quick enough
    # to see the messages first waits a moment for it.
    for _ in range(50):
        try:
            async for value in DBOS.read_stream_async(turn_id, STREAM_KEY):
                yield expand(value)
            return
        except dbos_errors.DBOSNonExistentWorkflowError:
            await asyncio.sleep(0.1)
