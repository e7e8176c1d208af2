"""Integrity at the edges: identity is an immutable id, delete means gone from every table,
limits and one-reply-at-a-time hold under parallel requests, and a turn's stream always
ends."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest

from tests.api_client import as_user, new_conversation, send, stream, wait_for_status
from tests.conftest import BACKENDS, ParleyServer, unique
from tests.fake_provider import FakeProvider
from tests.test_accounts import Person

# --- Looking for text in every table of every database -------------------------------


def _readable(value: object) -> Iterator[str]:
    """A stored value as text, and as what it decodes to: base64 (DBOS's serialised
    values), JSON, and raw bytes (pickles, msgpack) read as UTF-8."""
    if value is None:
        return
    if isinstance(value, memoryview):
        value = value.tobytes()
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="ignore")
    elif isinstance(value, dict | list):
        text = json.dumps(value)
    else:
        text = str(value)
    yield text
    compact = text.strip()
    if len(compact) >= 8 and len(compact) % 4 == 0:
        with contextlib.suppress(binascii.Error, ValueError):
            yield base64.b64decode(compact, validate=True).decode("utf-8", errors="ignore")
    with contextlib.suppress(ValueError):
        yield json.dumps(json.loads(text), ensure_ascii=False)


def places_holding(server: ParleyServer, needle: str) -> list[str]:
    """Every ``database.table.column`` in which some row holds ``needle``."""
    found: set[str] = set()
    if "DATABASE_URL" not in server.env:
        for path in sorted(server.data_dir.glob("*.sqlite")):
            with sqlite3.connect(path) as conn:
                tables = [
                    row[0]
                    for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
                ]
                for table in tables:
                    cursor = conn.execute(f'SELECT * FROM "{table}"')
                    columns = [d[0] for d in cursor.description]
                    for row in cursor:
                        for column, value in zip(columns, row, strict=True):
                            if any(needle in text for text in _readable(value)):
                                found.add(f"{path.name}.{table}.{column}")
        return sorted(found)
    with psycopg.connect(server.env["DATABASE_URL"]) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        for schema, table in tables:
            cursor = conn.execute(f'SELECT * FROM "{schema}"."{table}"')
            columns = [d.name for d in cursor.description or []]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    if any(needle in text for text in _readable(value)):
                        found.add(f"{schema}.{table}.{column}")
    return sorted(found)


def wait_until_gone(server: ParleyServer, needles: list[str], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while True:
        left = {needle: places_holding(server, needle) for needle in needles}
        left = {needle: places for needle, places in left.items() if places}
        if not left:
            return
        assert time.monotonic() < deadline, f"still stored after deletion: {left}"
        time.sleep(0.25)


def secret() -> str:
    return f"SECRET-{uuid.uuid4().hex}"


# --- Fixtures ------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _server(
    make_server: Callable[..., ParleyServer], database_url: str | None, **env: str
) -> ParleyServer:
    return make_server(database_url, **env).start()


def _admin_and(server: ParleyServer) -> Person:
    admin = Person(server, unique("admin"))
    response = admin.signup()
    assert response.status_code == 201 and response.json()["is_admin"], response.text
    return admin


def _chat(person: Person, text: str, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return person.change(
        "POST", "/chat", json={"message": text, "username": person.name}, headers=headers
    )


# --- 1. Identity is an immutable id --------------------------------------------------


def test_a_new_account_with_a_removed_ones_name_inherits_nothing(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    server = _server(make_server, database_url, PARLEY_AUTH="accounts")
    admin = _admin_and(server)
    diary = f"carol's diary: {secret()}"
    carol = Person(server, unique("carol"))
    assert carol.signup().status_code == 201
    first = _chat(carol, diary, key="1")
    assert first.status_code == 200 and diary in first.json()["content"], first.text
    mine = carol.change("POST", "/api/conversations").json()["id"]
    turn = send(carol.http, mine, diary, **{"X-CSRF-Token": carol.http.cookies["parley_csrf"]})
    list(stream(carol.http, turn))

    assert admin.change("DELETE", f"/api/admin/users/{carol.name}").status_code == 204

    newcomer = Person(server, carol.name)
    assert newcomer.signup().status_code == 201
    hello = _chat(newcomer, "hi", key="1")
    assert hello.status_code == 200, hello.text
    assert diary not in hello.text
    history = newcomer.http.get(f"/history/{carol.name}")
    assert history.status_code == 200
    assert diary not in history.text
    assert [m["content"] for m in history.json() if m["isUser"]] == ["hi"]
    listed = newcomer.http.get("/api/conversations").json()["conversations"]
    assert mine not in [c["id"] for c in listed]
    assert newcomer.http.get(f"/api/conversations/{mine}").status_code == 404
    assert newcomer.http.get(f"/api/turns/{turn}/stream").status_code == 404
    wait_until_gone(server, [diary])


def test_removing_a_user_is_one_transaction(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    """Killed while removing a user with many conversations, Parley keeps all of them or
    none, and whoever takes the name gets none."""
    server = _server(make_server, database_url, PARLEY_AUTH="accounts")
    admin = _admin_and(server)
    dave = Person(server, unique("dave"))
    assert dave.signup().status_code == 201
    made = [dave.change("POST", "/api/conversations").json()["id"] for _ in range(300)]
    with ThreadPoolExecutor(1) as pool:
        removal = pool.submit(admin.change, "DELETE", f"/api/admin/users/{dave.name}")
        time.sleep(0.05)
        server.kill()
        with contextlib.suppress(httpx.TransportError):
            removal.result()
    server.start()
    admin.http.cookies.clear()
    assert admin.login().status_code == 200
    users = [u["username"] for u in admin.http.get("/api/admin/users").json()]
    owners = _count_owned_conversations(server, made)
    if dave.name in users:
        assert owners == len(made)  # nothing removed
        assert admin.change("DELETE", f"/api/admin/users/{dave.name}").status_code == 204
    else:
        assert owners == 0
    newcomer = Person(server, dave.name)
    assert newcomer.signup().status_code == 201
    assert newcomer.http.get("/api/conversations").json()["conversations"] == []
    assert _count_owned_conversations(server, made) == 0


def test_a_request_in_flight_stores_nothing_for_a_removed_account(
    make_server: Callable[..., ParleyServer], database_url: str | None, provider: FakeProvider
) -> None:
    """A /chat waiting behind the account's previous turn when an admin removes the
    account: it must not bring the conversation back, under nobody's name."""
    server = _server(make_server, database_url, PARLEY_AUTH="accounts")
    admin = _admin_and(server)
    lena = Person(server, unique("lena"))
    assert lena.signup().status_code == 201
    first, second = secret(), secret()
    clients = _clients(lena, server, 2)
    provider.hold()
    try:
        with ThreadPoolExecutor(2) as pool:
            body = {"username": lena.name}
            asked = pool.submit(
                clients[0].post, "/chat", json={**body, "message": f"[hang] {first}"}
            )
            deadline = time.monotonic() + 10
            while not any(first in call.last_user for call in provider.calls):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            waiting = pool.submit(clients[1].post, "/chat", json={**body, "message": second})
            time.sleep(0.5)
            assert admin.change("DELETE", f"/api/admin/users/{lena.name}").status_code == 204
            provider.release()
            assert asked.result().status_code in (401, 409), asked.result().text
            assert waiting.result().status_code == 401, waiting.result().text
    finally:
        provider.release()
        for client in clients:
            client.close()
    wait_until_gone(server, [first, second])


def _count_owned_conversations(server: ParleyServer, ids: list[str]) -> int:
    placeholders = ",".join("?" for _ in ids)
    query = f"SELECT count(*) FROM conversations WHERE id IN ({placeholders})"
    if "DATABASE_URL" not in server.env:
        with sqlite3.connect(server.data_dir / "parley.sqlite") as conn:
            return int(conn.execute(query, ids).fetchone()[0])
    with psycopg.connect(server.env["DATABASE_URL"]) as conn:
        row = conn.execute(query.replace("?", "%s"), ids).fetchone()
        return int(row[0]) if row else 0


# --- Delete means gone ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["conversation", "user"])
def test_deleted_text_is_in_no_table_of_any_database(
    make_server: Callable[..., ParleyServer],
    database_url: str | None,
    provider: FakeProvider,
    how: str,
) -> None:
    server = _server(make_server, database_url, PARLEY_AUTH="accounts")
    admin = _admin_and(server)
    erin = Person(server, unique("erin"))
    assert erin.signup().status_code == 201
    csrf = {"X-CSRF-Token": erin.http.cookies["parley_csrf"]}
    chatted, streamed, failed, unfinished = secret(), secret(), secret(), secret()
    edited = secret()
    assert _chat(erin, f"{chatted} once", key="k1").status_code == 200
    conversation = erin.change("POST", "/api/conversations").json()["id"]
    list(stream(erin.http, send(erin.http, conversation, f"{streamed} twice", **csrf)))
    list(stream(erin.http, send(erin.http, conversation, f"[fail:400] {failed}", **csrf)))
    # Other branches: a regenerated reply, and an edited message with its reply.
    path = f"/api/conversations/{conversation}/messages"
    asked, reply = erin.http.get(path).json()["messages"][:2]
    again = erin.http.post(f"{path}/{reply['id']}/regenerate", headers=csrf)
    assert again.status_code == 202, again.text
    list(stream(erin.http, again.json()["turn_id"]))
    changed = erin.http.post(
        path, json={"content": f"{edited} edited", "replaces": asked["id"]}, headers=csrf
    )
    assert changed.status_code == 202, changed.text
    list(stream(erin.http, changed.json()["turn_id"]))
    other = erin.change("POST", "/api/conversations").json()["id"]
    # A reply still being written when its conversation goes.
    slow = send(erin.http, other, f"[slow:0.2] {unfinished} " + "word " * 100, **csrf)
    for event in stream(erin.http, slow):
        if event.event == "token":
            break
    # An imported conversation.
    imported = secret()
    document = {
        "format": "parley",
        "version": 1,
        "conversations": [
            {
                "id": "elsewhere",
                "created_at": "2026-01-01T00:00:00Z",
                "updated_at": "2026-01-01T00:00:00Z",
                "messages": [
                    {
                        "id": 1,
                        "role": "user",
                        "content": imported,
                        "created_at": "2026-01-01T00:00:00Z",
                    }
                ],
            }
        ],
    }
    answer = erin.change("POST", "/api/import", json=document)
    assert answer.status_code == 201, answer.text
    for needle in (chatted, streamed, edited, imported):
        assert places_holding(server, needle), "the test looks in the wrong places"
    # The search index holds words, not the text: look for one word of it too.
    word = chatted.split("-")[1]
    if "DATABASE_URL" in server.env:
        assert places_holding(server, word), "the test looks in the wrong places"

    if how == "conversation":
        listed = erin.http.get("/api/conversations").json()["conversations"]
        assert len(listed) == 4
        for item in listed:
            assert erin.change("DELETE", f"/api/conversations/{item['id']}").status_code == 204
    else:
        assert admin.change("DELETE", f"/api/admin/users/{erin.name}").status_code == 204
    wait_until_gone(server, [chatted, streamed, failed, unfinished, edited, imported, word])
    # A key used in a deleted conversation names nothing now.
    if how == "conversation":
        again = _chat(erin, "hi", key="k1")
        assert again.status_code == 200 and chatted not in again.text


# --- Idempotency keys never revive deleted content ----------------------------------


def test_a_key_reused_after_deletion_starts_a_new_turn(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    server = _server(make_server, database_url)
    with server.client() as http:
        name = unique("frank")
        as_user(http, name)
        hidden = secret()
        first = http.post(
            "/chat", json={"message": hidden, "username": name}, headers={"Idempotency-Key": "1"}
        )
        assert hidden in first.json()["content"]
        (seed,) = http.get("/api/conversations").json()["conversations"]
        assert http.delete(f"/api/conversations/{seed['id']}").status_code == 204
        again = http.post(
            "/chat", json={"message": "hi", "username": name}, headers={"Idempotency-Key": "1"}
        )
        assert again.status_code == 200, again.text
        assert hidden not in again.text and "hi" in again.json()["content"]

        # The same through the streaming API: a fresh turn that finishes.
        for attempt in range(4):
            conversation = new_conversation(http)
            turn = send(http, conversation, "hello", **{"Idempotency-Key": "2"})
            events = list(stream(http, turn))
            assert events[-1].event == "done", events
            wait_for_status(http, conversation, "complete")
            if attempt < 3:
                assert http.delete(f"/api/conversations/{conversation}").status_code == 204
        # Not blocked by replies that never end.
        assert send(http, new_conversation(http), "still free")


# --- Limits and one reply at a time, under parallel requests ------------------------


def _at_once(count: int, call: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(call, range(count)))


def _clients(person: Person, server: ParleyServer, count: int) -> list[httpx.Client]:
    clients = []
    for _ in range(count):
        client = server.client()
        client.cookies.update(person.http.cookies)
        client.headers["X-CSRF-Token"] = person.http.cookies["parley_csrf"]
        clients.append(client)
    return clients


def _sends_at_once(
    server: ParleyServer, count: int, text: Callable[[int], str]
) -> list[httpx.Response]:
    """One user's ``count`` messages, each to a conversation of its own, sent at once."""
    person = Person(server)
    assert person.signup().status_code == 201
    clients = _clients(person, server, count)
    made = [person.change("POST", "/api/conversations").json()["id"] for _ in range(count)]
    try:
        return _at_once(
            count,
            lambda i: clients[i].post(
                f"/api/conversations/{made[i]}/messages", json={"content": text(i)}
            ),
        )
    finally:
        for client in clients:
            client.close()


def test_parallel_turns_stay_within_a_users_limits(
    make_server: Callable[..., ParleyServer], database_url: str | None, provider: FakeProvider
) -> None:
    server = _server(
        make_server,
        database_url,
        PARLEY_AUTH="accounts",
        PARLEY_CONCURRENT_TURNS="3",
        PARLEY_TURNS_PER_MINUTE="30",
    )
    marker = secret()
    provider.hold()
    try:
        answers = _sends_at_once(server, 60, lambda i: f"[hang] {marker} {i}")
        codes = sorted(r.status_code for r in answers)
        assert codes == [202] * 3 + [429] * 57, codes
        deadline = time.monotonic() + 10
        while len([c for c in provider.calls if marker in c.last_user]) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        assert len([c for c in provider.calls if marker in c.last_user]) == 3
    finally:
        provider.release()


def test_parallel_turns_stay_within_the_rate_per_minute(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    server = _server(
        make_server,
        database_url,
        PARLEY_AUTH="accounts",
        PARLEY_CONCURRENT_TURNS="100",
        PARLEY_TURNS_PER_MINUTE="10",
    )
    answers = _sends_at_once(server, 40, lambda i: f"n{i}")
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] * 10 + [429] * 30, codes


def test_parallel_messages_in_one_conversation_start_one_turn(
    make_server: Callable[..., ParleyServer], database_url: str | None, provider: FakeProvider
) -> None:
    server = _server(make_server, database_url)
    name = unique("ivy")
    marker = secret()
    for _ in range(3):
        with server.client() as http:
            conversation = new_conversation(as_user(http, name))
        clients = [as_user(server.client(), name) for _ in range(20)]
        try:
            answers = _at_once(
                20,
                lambda i, conversation=conversation, clients=clients: clients[i].post(
                    f"/api/conversations/{conversation}/messages",
                    json={"content": f"[slow:0.05] {marker} {i} a b c"},
                ),
            )
        finally:
            for client in clients:
                client.close()
        codes = sorted(r.status_code for r in answers)
        assert codes == [202] + [409] * 19, codes
        with server.client() as http:
            found = wait_for_status(as_user(http, name), conversation, "complete")
        assert [m["role"] for m in found] == ["user", "assistant"]
    assert len([c for c in provider.calls if marker in c.last_user]) == 3


def test_conversation_pages_skip_no_conversation_sharing_a_time(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    server = _server(make_server, database_url)
    name = unique("kim")
    with server.client() as http:
        made = {new_conversation(as_user(http, name)) for _ in range(7)}
    _set_all_times(server, made)
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    with server.client() as http:
        as_user(http, name)
        for _ in range(len(made)):
            page = http.get("/api/conversations", params=params).json()
            seen += [c["id"] for c in page["conversations"]]
            if not page["has_more"]:
                break
            last = page["conversations"][-1]
            params = {"limit": 2, "before": last["updated_at"], "before_id": last["id"]}
    assert sorted(seen) == sorted(made)
    assert len(seen) == len(made)


def _set_all_times(server: ParleyServer, ids: set[str]) -> None:
    same = "UPDATE conversations SET updated_at = ?, created_at = ? WHERE id = ?"
    if "DATABASE_URL" not in server.env:
        moment = "2026-01-01 00:00:00.000000"  # as SQLAlchemy writes a time to SQLite
        with sqlite3.connect(server.data_dir / "parley.sqlite") as conn:
            for conversation in ids:
                conn.execute(same, (moment, moment, conversation))
        return
    moment = "2026-01-01 00:00:00+00:00"
    with psycopg.connect(server.env["DATABASE_URL"]) as conn:
        for conversation in ids:
            conn.execute(same.replace("?", "%s"), (moment, moment, conversation))
