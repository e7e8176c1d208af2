"""A reply written on one replica, read and stopped through another, live.

A reader on the other replica, or a stop asked there, is a flag in the reply's row and,
on PostgreSQL, a notification that the writing replica hears at once
(``parley.streams.listen``); the writer then puts its pieces in the durable stream a frame
at a time. The replicas here check the flags only every 30 s, so that only the
notification can bring what is asked in time.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from parley import streams
from tests.api_client import (
    Sse,
    as_streamed,
    as_user,
    messages,
    new_conversation,
    send,
    stream,
    text_of,
)
from tests.conftest import QUICK_RETRIES, ParleyServer, PostgresDatabases, unique
from tests.fake_provider import FakeProvider, reply_for, word_ends

# --- The writer, without a server ------------------------------------------------------

FRAME = 0.05


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The durable stream's values, as a turn's writer writes them, in a DBOS step."""
    values: list[dict[str, Any]] = []

    async def write(key: str, value: dict[str, Any]) -> None:
        values.append(value)

    monkeypatch.setattr(streams.DBOS, "write_stream_async", write)
    monkeypatch.setattr(streams, "_current_step", lambda: 3)
    before = set(streams._live)
    yield values
    for turn_id in set(streams._live) - before:
        streams._live.pop(turn_id)


def texts(values: list[dict[str, Any]]) -> list[list[str]]:
    return [value.get("texts", []) for value in values]


async def test_pieces_held_in_a_frame_go_out_when_it_ends_without_another_token(
    written: list[dict[str, Any]],
) -> None:
    writer = streams.TurnWriter(unique("turn"), 1, flush_seconds=FRAME)
    writer.live.follow_elsewhere()
    await writer.token("a")  # the first piece goes out at once
    await asyncio.sleep(0.01)
    await writer.token(" b")  # within the frame: held
    await writer.token(" c")
    await asyncio.sleep(0.01)
    assert texts(written) == [["a"]]
    await asyncio.sleep(FRAME * 3)  # no token comes
    assert texts(written) == [["a"], [" b", " c"]]
    assert [value["n"] for value in written] == [1, 2]


async def test_pieces_reach_readers_here_while_the_database_is_slow(
    written: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durable writes run beside the model's pieces, never in their way."""
    gate = asyncio.Event()

    async def hanging_write(key: str, value: dict[str, Any]) -> None:
        await gate.wait()
        written.append(value)

    monkeypatch.setattr(streams.DBOS, "write_stream_async", hanging_write)
    writer = streams.TurnWriter(unique("turn"), 1, flush_seconds=FRAME)
    writer.live.follow_elsewhere()
    for i in range(20):
        await asyncio.wait_for(writer.token(f" w{i}"), FRAME / 2)
    assert writer.live.text == "".join(f" w{i}" for i in range(20))
    gate.set()
    await asyncio.sleep(FRAME * 3)
    assert [piece for value in written for piece in value["texts"]] == [f" w{i}" for i in range(20)]
    assert len(written) == 2  # one write under way, then one for what came meanwhile


async def test_a_follow_request_sends_the_pieces_held_so_far_at_once(
    written: list[dict[str, Any]],
) -> None:
    turn_id = unique("turn")
    writer = streams.TurnWriter(turn_id, 1, flush_seconds=FRAME)
    await writer.token("a")
    await writer.token(" b")
    assert written == []  # nobody follows elsewhere: the end event will carry them
    streams.asked_elsewhere("follow", turn_id)
    await asyncio.sleep(0.01)  # far less than a frame, and no token
    assert texts(written) == [["a", " b"]]
    streams.asked_elsewhere("stop", turn_id)
    assert writer.stopped


async def test_the_end_waits_for_a_write_under_way_and_carries_the_pieces_of_one_that_failed(
    written: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    turn_id = unique("turn")
    writer = streams.TurnWriter(turn_id, 1, flush_seconds=FRAME)
    writer.live.follow_elsewhere()
    await writer.token("a")
    await asyncio.sleep(0.01)
    under_way, gate = asyncio.Event(), asyncio.Event()

    async def slow_failing_write(key: str, value: dict[str, Any]) -> None:
        under_way.set()
        await gate.wait()
        raise ConnectionError("the database went away")

    monkeypatch.setattr(streams.DBOS, "write_stream_async", slow_failing_write)
    await writer.token(" b")  # held, then written when the frame ends: that write hangs
    await asyncio.wait_for(under_way.wait(), 1)
    await writer.token(" c")  # within the next frame: held
    tail = writer.tail()  # what the model step hands to the end event
    assert tail is not None and tail["texts"] == [" c"]

    async def write(key: str, value: dict[str, Any]) -> None:
        written.append(value)

    done = streams.Event(streams.EventId(2, 0), "done", {})
    ending = asyncio.create_task(streams.finish(turn_id, done, tail))
    await asyncio.sleep(0.01)
    assert not ending.done()  # it waits for the write under way
    monkeypatch.setattr(streams.DBOS, "write_stream_async", write)
    gate.set()
    await ending
    assert texts(written) == [["a"], [" b", " c"]]
    assert written[-1]["n"] == 2 and written[-1]["end"]["type"] == "done"


async def test_no_piece_is_written_once_the_step_has_ended(
    written: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = streams.TurnWriter(unique("turn"), 1, flush_seconds=FRAME)
    writer.live.follow_elsewhere()
    await writer.token("a")
    await asyncio.sleep(0.01)
    await writer.token(" b")
    monkeypatch.setattr(streams, "_current_step", lambda: None)  # the step failed
    await asyncio.sleep(FRAME * 3)
    assert texts(written) == [["a"]]


# --- Two replicas on one PostgreSQL database --------------------------------------------


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    provider: FakeProvider,
    postgres_databases: PostgresDatabases,
) -> Iterator[tuple[ParleyServer, ParleyServer]]:
    """Two replicas, ``a`` and ``b``, one process each, that check for stop and follow
    requests only every 30 s."""
    database_url = postgres_databases.new_url()
    started: list[ParleyServer] = []
    try:
        for name in ("a", "b"):
            env = {
                **QUICK_RETRIES,
                "OPENAI_BASE_URL": provider.base_url,
                "DATABASE_URL": database_url,
                "PARLEY_EXECUTOR_ID": name,
                "PARLEY_WORKERS": "1",
                "PARLEY_STOP_POLL_SECONDS": "30",
            }
            server = ParleyServer(tmp_path_factory.mktemp(f"replica-{name}"), env)
            started.append(server)
            server.start()
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def clients(
    replicas: tuple[ParleyServer, ParleyServer],
) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """One user's clients of replica a and of replica b."""
    user = unique()
    a, b = replicas
    with as_user(a.client(), user) as on_a, as_user(b.client(), user) as on_b:
        yield on_a, on_b


def read_timed(http: httpx.Client, turn_id: str, into: list[tuple[float, Sse]]) -> None:
    for event in stream(http, turn_id):
        into.append((time.monotonic(), event))


def piece_arrivals(timed: list[tuple[float, Sse]], ends: list[int]) -> list[float]:
    """When a reader had each piece of the reply, a piece being the text up to one of
    ``ends`` (offsets in the reply)."""
    arrivals: list[float] = []
    length = 0
    for at, event in timed:
        if event.event == "token":
            length += len(event.data["text"])
            while len(arrivals) < len(ends) and ends[len(arrivals)] <= length:
                arrivals.append(at)
    assert len(arrivals) == len(ends)
    return arrivals


@pytest.mark.postgres
def test_a_reader_on_another_replica_gets_each_piece_as_it_is_written(
    clients: tuple[httpx.Client, httpx.Client],
) -> None:
    """60 pieces over 3 s, written on a, read on a and on b from the start: b gets them
    a frame or so behind a, not in one-second batches."""
    on_a, on_b = clients
    conversation = new_conversation(on_a)
    question = unique("[slow:0.05] " + " ".join(f"w{i}" for i in range(60)))
    turn_id = send(on_a, conversation, question)
    seen: dict[str, list[tuple[float, Sse]]] = {"a": [], "b": []}
    readers = [
        threading.Thread(target=read_timed, args=(http, turn_id, seen[name]))
        for name, http in (("a", on_a), ("b", on_b))
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=60)

    events = [event for _, event in seen["b"]]
    assert events and events[-1].event == "done", events[-3:]
    assert [event.event for event in events[:-1]] == ["token"] * (len(events) - 1)
    assert text_of(events) == reply_for(question)
    assert events[-1].data["message"]["content"] == reply_for(question)
    ids = [tuple(map(int, event.id.split("."))) for event in events]
    assert ids == sorted(set(ids))
    assert text_of([event for _, event in seen["a"]]) == reply_for(question)

    # Before the last piece reached the reader on a, the one on b had pieces at many
    # separate moments: one-second batches would give it three at most.
    last_piece_on_a = [at for at, event in seen["a"] if event.event == "token"][-1]
    moments = 0
    previous = -1.0
    for at, event in seen["b"]:
        if event.event == "token" and at < last_piece_on_a:
            moments += at - previous > 0.01
            previous = at
    assert moments >= 12, moments

    ends = word_ends(reply_for(question))
    lags = [
        on_b - on_a
        for on_a, on_b in zip(
            piece_arrivals(seen["a"], ends), piece_arrivals(seen["b"], ends), strict=True
        )
    ]
    assert statistics.median(lags) < 0.25, sorted(lags)


def stop_through_b(on_a: httpx.Client, on_b: httpx.Client) -> float:
    """Start a 10 s reply on a, read it there, ask b to stop it after a few pieces; the
    seconds from asking to the reader on a getting ``stopped``."""
    conversation = new_conversation(on_a)
    question = unique("[slow:0.05] " + " ".join(f"w{i}" for i in range(200)))
    turn_id = send(on_a, conversation, question)
    seen: list[tuple[float, Sse]] = []
    asked_at = 0.0
    for event in stream(on_a, turn_id):
        seen.append((time.monotonic(), event))
        if len(seen) == 3:
            asked_at = time.monotonic()
            asked = on_b.post(f"/api/turns/{turn_id}/cancel")
            assert asked.status_code == 200, asked.text
            assert asked.json() == {"turn_id": turn_id, "status": "stopping"}
    stopped_at, last = seen[-1]
    assert last.event == "stopped", [event.event for _, event in seen[-3:]]
    final = last.data["message"]
    assert final["status"] == "stopped"
    assert reply_for(question).startswith(final["content"])
    assert as_streamed(messages(on_b, conversation)[-1]) == final
    return stopped_at - asked_at


@pytest.mark.postgres
def test_a_stop_asked_through_another_replica_takes_effect_at_once(
    clients: tuple[httpx.Client, httpx.Client],
) -> None:
    """Well within the 30 s the replicas wait between checks, and well within the 1 s
    they wait by default."""
    took = stop_through_b(*clients)
    assert took < 0.5, took


def listening(database_url: str) -> set[int]:
    """The server processes of the connections that listen for stop and follow requests."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE application_name = 'parley-listen' AND datname = current_database()"
        ).fetchall()
    return {pid for (pid,) in rows}


@pytest.mark.postgres
def test_a_replica_listens_again_after_losing_its_connection(
    replicas: tuple[ParleyServer, ParleyServer], clients: tuple[httpx.Client, httpx.Client]
) -> None:
    database_url = replicas[0].env["DATABASE_URL"]
    before = listening(database_url)
    assert len(before) == 2, before  # one a process
    with psycopg.connect(database_url, autocommit=True) as conn:
        for pid in before:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 15
    while len(listening(database_url) - before) < 2:
        assert time.monotonic() < deadline, "the replicas did not listen again"
        time.sleep(0.05)
    took = stop_through_b(*clients)
    assert took < 0.5, took
