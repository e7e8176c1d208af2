"""A turn survives the server being killed while it waits on the model."""

from __future__ import annotations

import concurrent.futures
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import httpx
import pytest

from tests.api_client import (
    Sse,
    as_user,
    messages,
    new_conversation,
    send,
    send_and_finish,
    stored,
    stream,
    text_of,
)
from tests.conftest import BACKENDS, ParleyServer, unique
from tests.fake_provider import FakeProvider, answered, reply_for


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_turn_killed_mid_model_call_completes_once_after_restart(
    make_server: Callable[..., ParleyServer],
    database_url: str | None,
    provider: FakeProvider,
) -> None:
    server = make_server(database_url).start()
    user = unique()
    first, second, third = unique("first"), unique("[hang] second"), unique("third")
    with server.client() as http:
        assert http.post("/chat", json={"message": first, "username": user}).status_code == 200

    provider.hold()
    outcome: dict[str, object] = {}

    def doomed_request() -> None:
        try:
            with server.client(timeout=60) as http:
                outcome["response"] = http.post(
                    "/chat",
                    json={"message": second, "username": user},
                    headers={"Idempotency-Key": "crash-me"},
                )
        except httpx.TransportError as error:
            outcome["error"] = error

    request = threading.Thread(target=doomed_request)
    request.start()
    wait_for(lambda: len(provider.calls_for(second)) == 1)
    server.kill()
    request.join(timeout=10)
    assert "error" in outcome, "the request should have died with the server"

    provider.release()
    server.start()
    with server.client() as http:
        # The recovered workflow finishes by itself ...
        wait_for(lambda: len(http.get(f"/history/{user}").json()) == 4)
        # ... and the client's retry with its key joins it instead of starting another.
        retry = http.post(
            "/chat",
            json={"message": second, "username": user},
            headers={"Idempotency-Key": "crash-me"},
        )
        assert retry.status_code == 200
        assert retry.json()["content"] == reply_for(second)

        assert http.get(f"/history/{user}").json() == [
            {"content": first, "isUser": True},
            {"content": reply_for(first), "isUser": False},
            {"content": second, "isUser": True},
            {"content": reply_for(second), "isUser": False},
        ]
        # Once before the kill, once on recovery: never more.
        assert len(provider.calls_for(second)) == 2

        assert http.post("/chat", json={"message": third, "username": user}).status_code == 200
    (call,) = provider.calls_for(third)
    assert [(m["role"], m["content"]) for m in call.messages[1:]] == [
        ("user", first),
        ("assistant", reply_for(first)),
        ("user", second),
        ("assistant", reply_for(second)),
        ("user", third),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_history_and_memory_survive_a_restart(
    make_server: Callable[..., ParleyServer],
    database_url: str | None,
    provider: FakeProvider,
) -> None:
    server = make_server(database_url).start()
    user, before, after = unique(), unique("before"), unique("after")
    with server.client() as http:
        assert http.post("/chat", json={"message": before, "username": user}).status_code == 200
    server.stop()
    server.start()
    with server.client() as http:
        assert len(http.get(f"/history/{user}").json()) == 2
        assert http.post("/chat", json={"message": after, "username": user}).status_code == 200
    (call,) = provider.calls_for(after)
    assert [m["content"] for m in call.messages[1:]] == [before, reply_for(before), after]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_streaming_turn_killed_mid_reply_completes_once_after_restart(
    make_server: Callable[..., ParleyServer],
    database_url: str | None,
    provider: FakeProvider,
) -> None:
    server = make_server(database_url, PARLEY_STREAM_FLUSH_SECONDS="0.2").start()
    user = unique()
    question = unique("[slow:0.1] " + " ".join(f"w{i}" for i in range(30)))
    with as_user(server.client(), user) as http:
        conversation = new_conversation(http)
        turn_id = send(http, conversation, question)
        seen = []
        for event in stream(http, turn_id):
            seen.append(event)
            if len(seen) == 8:
                break
    server.kill()

    server.start()
    with as_user(server.client(), user) as http:
        rest = list(stream(http, turn_id, after=seen[-1].id))
        # The model was asked again: the stream says so before the new text.
        assert "reset" in [event.event for event in rest]
        assert rest[-1].event == "done"
        assert text_of(seen + rest) == reply_for(question)
        assert text_of(list(stream(http, turn_id))) == reply_for(question)
        assert [(m["role"], m["content"], m["status"]) for m in messages(http, conversation)] == [
            ("user", question, "complete"),
            ("assistant", reply_for(question), "complete"),
        ]
        follow_up = unique("and then?")
        send_and_finish(http, conversation, follow_up)
    assert len(provider.calls_for(question)) == 2
    (call,) = provider.calls_for(follow_up)
    assert [(m["role"], m["content"]) for m in call.messages[1:]] == [
        ("user", question),
        ("assistant", reply_for(question)),
        ("user", follow_up),
    ]


T = TypeVar("T")


def retrying(action: Callable[[], T], deadline: float) -> T:
    """Do ``action`` until it works: while the server is down or starting, it cannot."""
    while True:
        try:
            return action()
        except (httpx.TransportError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def follow_to_the_end(http: httpx.Client, turn_id: str, deadline: float) -> list[Sse]:
    """Read a turn's stream to its end event, reconnecting after each kill."""
    events: list[Sse] = []
    while not events or events[-1].event not in ("done", "error", "stopped"):
        try:
            for event in stream(http, turn_id, after=events[-1].id if events else None):
                events.append(event)
        except (httpx.TransportError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return events


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_accepted_turn_finishes_once_through_a_crash_loop(
    make_server: Callable[..., ParleyServer],
    database_url: str | None,
    provider: FakeProvider,
) -> None:
    """100 turns from 20 concurrent clients; the server is SIGKILLed 5 times meanwhile."""
    server = make_server(database_url, PARLEY_STREAM_FLUSH_SECONDS="0.2").start()
    clients, turns_each, kills_wanted = 20, 5, 5
    deadline = time.monotonic() + 240
    spans: dict[str, tuple[float, float]] = {}
    kills: list[float] = []

    def client(index: int) -> tuple[str, str, list[str]]:
        user = unique(f"crash{index}")
        with as_user(server.client(timeout=30), user) as http:
            conversation = retrying(lambda: new_conversation(http), deadline)
            texts = []
            for turn in range(turns_each):
                text = unique(f"[slow:0.15] c{index} t{turn} " + " ".join("w" * 18))
                started = time.monotonic()
                key = f"turn-{turn}"
                turn_id = retrying(
                    lambda text=text, key=key: send(
                        http, conversation, text, **{"Idempotency-Key": key}
                    ),
                    deadline,
                )
                events = follow_to_the_end(http, turn_id, deadline)
                assert events[-1].event == "done", events[-1]
                assert text_of(events) == reply_for(text)
                spans[text] = (started, time.monotonic())
                texts.append(text)
        return user, conversation, texts

    def killer() -> None:
        chance = random.Random(7)
        for _ in range(kills_wanted):
            time.sleep(chance.uniform(1.0, 3.0))
            server.kill()
            kills.append(time.monotonic())
            server.start()

    with concurrent.futures.ThreadPoolExecutor(clients + 1) as pool:
        killing = pool.submit(killer)
        results = list(pool.map(client, range(clients)))
        killing.result()

    assert len(kills) == kills_wanted
    assert any(start < kill < end for kill in kills for start, end in spans.values())
    for user, conversation, texts in results:
        with as_user(server.client(), user) as http:
            assert stored(http, conversation) == answered(texts)
            # The model remembers each turn once, in order.
            follow_up = unique("and?")
            send_and_finish(http, conversation, follow_up)
        assert provider.remembered(follow_up) == [
            part for text in texts for part in (text, reply_for(text))
        ]
    # A turn is asked again only when a kill caught it in flight.
    for text, (start, end) in spans.items():
        caught = sum(start < kill < end for kill in kills)
        assert len(provider.calls_for(text)) <= 1 + caught, text
    assert server.count_in_dbos("workflow_status", "status IN ('PENDING', 'ENQUEUED')") == 0
