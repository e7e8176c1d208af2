"""Streaming turns: Server-Sent Events, resumption, replay, stop, several readers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from urllib.parse import quote

import httpx
import psycopg
import pytest

from tests.api_client import (
    Sse,
    as_streamed,
    as_user,
    messages,
    new_conversation,
    parse_sse,
    routes_of,
    send,
    send_and_finish,
    stream,
    stream_stopping,
    text_of,
    wait_for_status,
)
from tests.conftest import BACKENDS, ParleyServer, PostgresDatabases, unique
from tests.fake_provider import FakeProvider, reply_for
from tests.test_durability import wait_for


@pytest.fixture
def http(client: httpx.Client) -> httpx.Client:
    return as_user(client, unique())


# --- The stream ----------------------------------------------------------------------


def test_a_reply_streams_as_tokens_then_done(http: httpx.Client, provider: FakeProvider) -> None:
    conversation = new_conversation(http)
    question = unique("[slow:0.06] where be the gold")
    turn_id = send(http, conversation, question)
    events = list(stream(http, turn_id))

    assert [e.event for e in events[:-1]] == ["token"] * (len(events) - 1)
    assert len(events) > 5  # piece by piece as written, not in one lump
    assert text_of(events) == reply_for(question)
    done = events[-1]
    assert done.event == "done"
    assert done.data["message"]["content"] == reply_for(question)
    assert done.data["message"]["status"] == "complete"
    # Ids increase and are unique.
    ids = [tuple(map(int, e.id.split("."))) for e in events]
    assert ids == sorted(set(ids))

    user_message, reply = messages(http, conversation)
    assert (user_message["role"], user_message["content"], user_message["status"]) == (
        "user",
        question,
        "complete",
    )
    # The stream ends with the message as stored; the list adds its versions.
    assert reply.pop("siblings") == [reply["id"]]
    assert reply == done.data["message"]
    assert user_message["turn_id"] == reply["turn_id"] == turn_id
    (call,) = provider.calls_for(question)
    assert call.stream


def test_a_finished_turn_replays_whole_and_resumes_after_any_event(http: httpx.Client) -> None:
    conversation = new_conversation(http)
    question = unique("[slow:0.01] one two three four five")
    turn_id = send(http, conversation, question)
    live = list(stream(http, turn_id))  # piece by piece, as it was written
    everything = list(stream(http, turn_id))
    assert list(stream(http, turn_id)) == everything  # a replay is always the same
    assert text_of(everything) == text_of(live) == reply_for(question)
    assert everything[-1] == live[-1]
    # Resuming after any event, of the live reading or of a replay, misses nothing and
    # repeats nothing.
    for seen in (live, everything):
        for index, event in enumerate(seen):
            rest = list(stream(http, turn_id, after=event.id))
            assert text_of(seen[: index + 1]) + text_of(rest) == reply_for(question)
            assert rest[-1:] == seen[-1:] if index < len(seen) - 1 else rest == []
    middle = everything[len(everything) // 2]
    assert (
        list(stream(http, turn_id, after=middle.id, query=True))
        == everything[everything.index(middle) + 1 :]
    )


def test_reconnecting_mid_reply_misses_nothing_and_repeats_nothing(http: httpx.Client) -> None:
    conversation = new_conversation(http)
    question = unique("[slow:0.05] " + " ".join(f"w{i}" for i in range(30)))
    turn_id = send(http, conversation, question)
    seen: list[Sse] = []
    for cut in (2, 5, 9):
        for event in stream(http, turn_id, after=seen[-1].id if seen else None):
            seen.append(event)
            if len(seen) == cut:
                break  # drop the connection mid-reply
    seen.extend(stream(http, turn_id, after=seen[-1].id))
    assert seen[-1].event == "done"
    assert text_of(seen) == reply_for(question)
    ids = [tuple(map(int, e.id.split("."))) for e in seen]
    assert ids == sorted(set(ids))  # nothing repeated
    replay = list(stream(http, turn_id))
    assert text_of(replay) == text_of(seen) and replay[-1] == seen[-1]


def test_two_readers_of_one_turn_see_the_same_text(http: httpx.Client) -> None:
    conversation = new_conversation(http)
    question = unique("[slow:0.03] " + " ".join(f"w{i}" for i in range(20)))
    turn_id = send(http, conversation, question)
    results: dict[int, list[Sse]] = {}

    def read(index: int) -> None:
        with httpx.Client(base_url=str(http.base_url), headers=http.headers, timeout=30) as own:
            results[index] = list(stream(own, turn_id))

    readers = [threading.Thread(target=read, args=(index,)) for index in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=30)
    # The same text and the same end, however each reader's pieces were grouped.
    assert text_of(results[0]) == text_of(results[1]) == reply_for(question)
    assert results[0][-1] == results[1][-1]


def test_a_client_that_disconnects_does_not_stop_the_turn(http: httpx.Client) -> None:
    conversation = new_conversation(http)
    question = unique("[slow:0.02] " + " ".join(f"w{i}" for i in range(15)))
    turn_id = send(http, conversation, question)
    for _event in stream(http, turn_id):
        break
    reply = wait_for_status(http, conversation, "complete")[-1]
    assert reply["content"] == reply_for(question)


def test_stopping_keeps_what_was_written_and_the_model_remembers_it(
    http: httpx.Client, provider: FakeProvider
) -> None:
    conversation = new_conversation(http)
    question = unique("[slow:0.1] " + " ".join(f"w{i}" for i in range(60)))
    turn_id = send(http, conversation, question)
    seen = stream_stopping(http, turn_id)
    assert seen[-1].event == "stopped"
    shown = text_of(seen)
    assert shown and reply_for(question).startswith(shown) and shown != reply_for(question)
    final = seen[-1].data["message"]
    assert (final["status"], final["content"]) == ("stopped", shown)
    assert as_streamed(messages(http, conversation)[-1]) == final
    # Stopping again changes nothing.
    again = http.post(f"/api/turns/{turn_id}/cancel")
    assert again.json() == {"turn_id": turn_id, "status": "stopped"}

    follow_up = unique("and then?")
    send_and_finish(http, conversation, follow_up)
    (call,) = provider.calls_for(follow_up)
    assert [(m["role"], m["content"]) for m in call.messages[1:]] == [
        ("user", question),
        ("assistant", shown),
        ("user", follow_up),
    ]


@pytest.mark.parametrize(
    ("question", "why"),
    [
        ("[fail:400] doomed", "HTTP 400"),
        # A web page where the provider should be: not a stream of chat completion pieces.
        ("[malformed] hello", "not a chat completion"),
    ],
)
def test_a_failed_turn_says_why_and_the_next_one_works(
    http: httpx.Client, provider: FakeProvider, question: str, why: str
) -> None:
    conversation = new_conversation(http)
    failing = unique(question)
    events = list(stream(http, send(http, conversation, failing)))
    assert [e.event for e in events] == ["error"]
    assert why in events[0].data["detail"]
    user_message, reply = messages(http, conversation)
    assert user_message["content"] == failing
    assert (reply["status"], reply["content"]) == ("failed", "")
    assert why in reply["error"]
    # Asking again would get the same answer.
    assert len(provider.calls_for(failing)) == 1

    after = unique("after")
    send_and_finish(http, conversation, after)
    (call,) = provider.calls_for(after)
    assert [m["content"] for m in call.messages[1:]] == [after]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_quiet_stream_is_kept_alive_with_comments(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    server = make_server(database_url, PARLEY_STREAM_PING_SECONDS="0.2").start()
    with server.client() as client:
        http = as_user(client, unique())
        conversation = new_conversation(http)
        # The provider takes a second to answer: pings until the first piece.
        question = unique("[delay:1] hello")
        turn_id = send(http, conversation, question)
        with http.stream("GET", f"/api/turns/{turn_id}/stream") as response:
            lines = list(response.iter_lines())
    first_token = next(i for i, line in enumerate(lines) if line == "event: token")
    assert lines[:first_token].count(": ping") >= 3
    events = list(parse_sse(iter(lines)))
    assert events[-1].event == "done"
    assert text_of(events) == reply_for(question)


def test_a_retried_model_call_resets_the_stream(http: httpx.Client, provider: FakeProvider) -> None:
    conversation = new_conversation(http)
    question = unique("[fail-once:503] try again")
    events = list(stream(http, send(http, conversation, question)))
    assert events[-1].event == "done"
    assert text_of(events) == reply_for(question)
    assert len(provider.calls_for(question)) == 2


@pytest.mark.postgres
@pytest.mark.parametrize("ending", ["done", "stopped"])
def test_a_reply_stored_on_the_second_try_streams_again_after_the_reset(
    make_server: Callable[..., ParleyServer],
    postgres_databases: PostgresDatabases,
    provider: FakeProvider,
    ending: str,
) -> None:
    """Storing a finished (or stopped) reply fails once, its conversation's row locked
    past the statement timeout, so the step runs again: the model is not asked again, and
    the new epoch, which opens with a reset, carries the reply as remembered, so a reader
    is not left with none."""
    database_url = postgres_databases.new_url()
    server = make_server(
        database_url, PARLEY_DB_STATEMENT_TIMEOUT="1", PARLEY_LLM_RETRY_INTERVAL="0.5"
    ).start()

    def storing_waits() -> bool:
        with psycopg.connect(database_url, autocommit=True) as probe:
            row = probe.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
            return row is not None and row[0] > 0

    with as_user(server.client(), unique()) as http:
        conversation = new_conversation(http)
        question = unique("[slow:0.05] " + " ".join(f"w{i}" for i in range(40)))
        turn_id = send(http, conversation, question)
        events = stream(http, turn_id)
        seen = [next(events), next(events)]
        with psycopg.connect(database_url) as locker:
            locker.execute("SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", (conversation,))
            if ending == "stopped":
                assert http.post(f"/api/turns/{turn_id}/cancel").status_code == 200
            wait_for(storing_waits, 10)
            wait_for(lambda: not storing_waits(), 10)  # the statement timed out
            locker.rollback()
        seen += list(events)
    kinds = [event.event for event in seen]
    assert "reset" in kinds and kinds[-1] == ending
    final = seen[-1].data["message"]
    if ending == "done":
        assert final["content"] == reply_for(question)
    else:
        assert final["content"] and reply_for(question).startswith(final["content"])
    assert text_of(seen[kinds.index("reset") :]) == text_of(seen) == final["content"]
    assert len(provider.calls_for(question)) == 1


# --- Turns and conversations ---------------------------------------------------------


def test_one_reply_at_a_time_per_conversation(http: httpx.Client) -> None:
    conversation = new_conversation(http)
    first = send(http, conversation, unique("[slow:0.05] " + "w " * 20))
    busy = http.post(f"/api/conversations/{conversation}/messages", json={"content": "wait"})
    assert busy.status_code == 409
    assert "still being written" in busy.json()["detail"]
    list(stream(http, first))
    send_and_finish(http, conversation, unique("now"))
    assert len(messages(http, conversation)) == 4


def test_an_idempotency_key_returns_the_same_turn(
    http: httpx.Client, provider: FakeProvider
) -> None:
    conversation = new_conversation(http)
    text = unique("once")
    first = send(http, conversation, text, **{"Idempotency-Key": "k1"})
    list(stream(http, first))
    assert send(http, conversation, text, **{"Idempotency-Key": "k1"}) == first
    assert len(provider.calls_for(text)) == 1
    assert len(messages(http, conversation)) == 2
    reused = http.post(
        f"/api/conversations/{conversation}/messages",
        json={"content": "something else"},
        headers={"Idempotency-Key": "k1"},
    )
    assert reused.status_code == 422
    assert len(messages(http, conversation)) == 2


def test_conversations_are_created_listed_renamed_and_deleted(
    http: httpx.Client, provider: FakeProvider
) -> None:
    older = new_conversation(http)
    named = http.post("/api/conversations", json={"title": "Charts"}).json()
    assert named["title"] == "Charts"
    question = unique("Where is Tortuga?")
    send_and_finish(http, older, question)
    listed = http.get("/api/conversations").json()
    assert [c["id"] for c in listed["conversations"]] == [older, named["id"]]
    assert listed["conversations"][0]["title"] == question  # named after its first message
    assert not listed["has_more"]
    page = http.get("/api/conversations", params={"limit": 1}).json()
    assert len(page["conversations"]) == 1 and page["has_more"]

    renamed = http.patch(f"/api/conversations/{older}", json={"title": "  Tortuga  "})
    assert renamed.status_code == 200
    assert renamed.json()["title"] == "Tortuga"
    assert http.get(f"/api/conversations/{older}").json()["title"] == "Tortuga"

    assert http.delete(f"/api/conversations/{older}").status_code == 204
    assert http.get(f"/api/conversations/{older}").status_code == 404
    assert http.get(f"/api/conversations/{older}/messages").status_code == 404
    assert http.delete(f"/api/conversations/{older}").status_code == 404
    assert [c["id"] for c in http.get("/api/conversations").json()["conversations"]] == [
        named["id"]
    ]


def test_deleting_a_conversation_stops_its_reply_and_forgets_it(
    http: httpx.Client, provider: FakeProvider
) -> None:
    conversation = new_conversation(http)
    turn_id = send(http, conversation, unique("[slow:0.1] " + "w " * 40))
    events = stream(http, turn_id)
    next(events)
    assert http.delete(f"/api/conversations/{conversation}").status_code == 204
    assert http.get(f"/api/turns/{turn_id}/stream").status_code == 404


def test_message_pages(http: httpx.Client) -> None:
    conversation = new_conversation(http)
    for index in range(3):
        send_and_finish(http, conversation, f"m{index}")
    first = http.get(f"/api/conversations/{conversation}/messages", params={"limit": 4}).json()
    assert [m["content"] for m in first["messages"]][::2] == ["m1", "m2"]
    assert first["has_more"]
    older = http.get(
        f"/api/conversations/{conversation}/messages",
        params={"limit": 4, "before": first["messages"][0]["id"]},
    ).json()
    assert [m["content"] for m in older["messages"]] == ["m0", reply_for("m0")]
    assert not older["has_more"]


def test_the_seed_chat_shares_the_conversations(http: httpx.Client) -> None:
    user = http.headers["X-Parley-User"]
    reply = http.post("/chat", json={"message": "ahoy", "username": user})
    assert reply.json() == {"content": reply_for("ahoy"), "isUser": False}
    (conversation,) = http.get("/api/conversations").json()["conversations"]
    assert conversation["title"] == "ahoy"
    found = messages(http, conversation["id"])
    assert [(m["role"], m["content"]) for m in found] == [
        ("user", "ahoy"),
        ("assistant", reply_for("ahoy")),
    ]
    # A turn that did not stream still replays as a stream.
    events = list(stream(http, found[0]["turn_id"]))
    assert [e.event for e in events] == ["token", "done"]
    assert text_of(events) == reply_for("ahoy")


# --- Who may see what, and bad input -------------------------------------------------


def test_others_and_strangers_see_nothing(client: httpx.Client) -> None:
    owner = as_user(client, unique())
    conversation = new_conversation(owner)
    turn_id = send(owner, conversation, "secret")
    list(stream(owner, turn_id))
    owner_name = owner.headers["X-Parley-User"]

    as_user(client, unique())
    for method, path, body in routes_of(conversation, turn_id):
        response = client.request(method, path, json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert "secret" not in response.text
    assert client.get("/api/conversations").json()["conversations"] == []

    del client.headers["X-Parley-User"]
    assert client.get("/api/conversations").status_code == 401
    assert client.get(f"/api/turns/{turn_id}/stream").status_code == 401
    # The cookie the page sets works as well as the header.
    client.cookies.set("parley_user", owner_name)
    assert len(client.get(f"/api/conversations/{conversation}/messages").json()["messages"]) == 2
    client.cookies.clear()
    # The page stores the name percent-encoded: the API decodes it.
    spaced = unique("anne bonny")
    client.cookies.set("parley_user", quote(spaced))
    made = new_conversation(client)
    client.cookies.clear()
    as_user(client, spaced)
    assert [c["id"] for c in client.get("/api/conversations").json()["conversations"]] == [made]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/api/conversations", {"title": ""}, 422),
        ("POST", "/api/conversations", {"title": 7}, 422),
        ("POST", "/api/conversations", {"title": "x" * 201}, 422),
        ("POST", "/api/conversations", {"name": "typo"}, 422),
        ("GET", "/api/conversations?limit=0", None, 422),
        ("GET", "/api/conversations?limit=abc", None, 422),
        ("GET", "/api/conversations/not-a-uuid", None, 422),
        ("GET", "/api/conversations/0b8c4a4e-4c1e-4a9e-9a55-1f6f3f0b0c11", None, 404),
        ("GET", "/api/turns/turn-nope/stream", None, 422),
        ("GET", "/api/turns/turn-0b8c4a4e-4c1e-4a9e-9a55-1f6f3f0b0c11/stream", None, 404),
        ("POST", "/api/turns/turn-0b8c4a4e-4c1e-4a9e-9a55-1f6f3f0b0c11/cancel", None, 404),
    ],
)
def test_bad_requests_get_clear_errors(
    http: httpx.Client, method: str, path: str, body: object, status: int
) -> None:
    response = http.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"content": ""},
        {"content": "   "},
        {"content": 5},
        {"content": None},
        {"content": "x" * 16_001},
    ],
)
def test_bad_messages_are_refused_and_change_nothing(http: httpx.Client, body: object) -> None:
    conversation = new_conversation(http)
    response = http.post(f"/api/conversations/{conversation}/messages", json=body)
    assert response.status_code == 422, response.text
    assert messages(http, conversation) == []


def test_a_bad_resume_point_is_refused(http: httpx.Client) -> None:
    conversation = new_conversation(http)
    turn_id = send(http, conversation, "hi")
    for headers, params in [({"Last-Event-ID": "seven"}, {}), ({}, {"after": "1"})]:
        response = http.get(f"/api/turns/{turn_id}/stream", headers=headers, params=params)
        assert response.status_code == 422
    assert http.get("/api/conversations", headers={"X-Parley-User": "x" * 65}).status_code == 422


@pytest.fixture
def two_replicas(
    make_server: Callable[..., ParleyServer], postgres_databases: PostgresDatabases
) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """One user's clients of two replicas on one database. The first is to write the
    replies, and learns of what the second asks of them every 0.2 s."""
    database_url = postgres_databases.new_url()
    writer = make_server(
        database_url, PARLEY_STOP_POLL_SECONDS="0.2", PARLEY_STREAM_FLUSH_SECONDS="0.2"
    ).start()
    other = make_server(database_url).start()
    user = unique()
    with as_user(writer.client(), user) as first, as_user(other.client(), user) as second:
        yield first, second


@pytest.mark.postgres
def test_a_stop_asked_of_another_replica_stops_the_reply(
    two_replicas: tuple[httpx.Client, httpx.Client],
) -> None:
    """The replica writing the reply learns of a stop that a client asked of the other
    within ``PARLEY_STOP_POLL_SECONDS``."""
    first, second = two_replicas
    conversation = new_conversation(first)
    question = unique("[slow:0.1] " + " ".join(f"w{i}" for i in range(100)))
    turn_id = send(first, conversation, question)
    seen = stream_stopping(first, turn_id, stopper=second)
    assert seen[-1].event == "stopped"
    # 100 words at 0.1 s would take 10 s; the stop lands within a few polls.
    assert len([e for e in seen if e.event == "token"]) < 30
    final = seen[-1].data["message"]
    assert final["status"] == "stopped"
    assert reply_for(question).startswith(final["content"])
    assert as_streamed(messages(second, conversation)[-1]) == final


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reply_read_where_it_is_written_takes_one_durable_write(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    """With nobody following it from another process, a reply's pieces reach its durable
    stream with the end event, not a batch at a time; a later reader gets them all."""
    server = make_server(database_url, PARLEY_STREAM_FLUSH_SECONDS="0.1").start()
    with as_user(server.client(), unique()) as http:
        conversation = new_conversation(http)
        question = unique("[slow:0.05] " + " ".join(f"w{i}" for i in range(30)))
        turn_id = send(http, conversation, question)
        live = list(stream(http, turn_id))
        assert len(live) > 5 and text_of(live) == reply_for(question)
        assert server.count_in_dbos("streams", "workflow_uuid = ?", turn_id) == 1
        replay = list(stream(http, turn_id))
        assert replay[-1].event == "done" and text_of(replay) == reply_for(question)


@pytest.mark.postgres
def test_a_reader_on_another_replica_gets_the_reply_as_it_is_written(
    two_replicas: tuple[httpx.Client, httpx.Client],
) -> None:
    """The replica writing a reply puts its pieces in the durable stream only while a
    reader elsewhere follows it; that reader says so, and gets them as they come."""
    first, second = two_replicas
    conversation = new_conversation(first)
    question = unique("[slow:0.1] " + " ".join(f"w{i}" for i in range(60)))
    turn_id = send(first, conversation, question)
    seen: list[Sse] = []
    for event in stream(second, turn_id):
        if not seen:
            # The reply takes 6 s to write; its first piece comes well before that.
            assert messages(second, conversation)[-1]["status"] == "streaming"
        seen.append(event)
    assert seen[-1].event == "done"
    assert text_of(seen) == reply_for(question)
    # In batches as they were written, not in one lump with the end.
    assert len([e for e in seen if e.event == "token"]) > 5
