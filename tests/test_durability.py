"""A turn survives the server being killed while it waits on the model."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.api_client import (
    as_user,
    messages,
    new_conversation,
    send,
    send_and_finish,
    stream,
    text_of,
)
from tests.conftest import BACKENDS, ParleyServer, unique
from tests.fake_provider import FakeProvider, reply_for


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
