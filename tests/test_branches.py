"""Regenerating a reply, editing a message, branches, and a model and instructions per
conversation: through a running server, on SQLite and on PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.api_client import (
    as_user,
    messages,
    new_conversation,
    send,
    send_and_finish,
    stored,
    stream,
)
from tests.conftest import BACKENDS, ParleyServer, unique
from tests.fake_provider import FakeProvider, reply_for, take_for
from tests.test_durability import wait_for


def regenerate(http: httpx.Client, conversation: str, message_id: int, **headers: str) -> str:
    answer = http.post(
        f"/api/conversations/{conversation}/messages/{message_id}/regenerate", headers=headers
    )
    assert answer.status_code == 202, answer.text
    return answer.json()["turn_id"]


def edit(
    http: httpx.Client, conversation: str, message_id: int, content: str, **headers: str
) -> str:
    answer = http.post(
        f"/api/conversations/{conversation}/messages",
        json={"content": content, "replaces": message_id},
        headers=headers,
    )
    assert answer.status_code == 202, answer.text
    return answer.json()["turn_id"]


def finish(http: httpx.Client, turn_id: str) -> dict[str, Any]:
    events = list(stream(http, turn_id))
    assert events[-1].event == "done", events[-1]
    return events[-1].data["message"]


def branch(http: httpx.Client, conversation: str, **params: Any) -> list[dict[str, Any]]:
    answer = http.get(f"/api/conversations/{conversation}/messages", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()["messages"]


def contents(found: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in found]


def shown_before(provider: FakeProvider, text: str, take: int = 1) -> list[str]:
    """What the model was shown before ``text`` the ``take``-th time it was asked it."""
    call = provider.calls_for(text)[take - 1]
    return [m["content"] for m in call.messages[1:-1]]


@pytest.fixture
def http(client: httpx.Client) -> httpx.Client:
    return as_user(client, unique("brancher"))


# --- Regenerate ------------------------------------------------------------------------


def test_a_regenerated_reply_is_a_new_version_and_the_old_one_is_kept(
    http: httpx.Client, provider: FakeProvider
) -> None:
    conversation = new_conversation(http)
    question = unique("[nth] where be the gold?")
    send_and_finish(http, conversation, question)
    asked, first = messages(http, conversation)
    assert first["content"] == take_for(question, 1)
    assert (asked["parent_id"], first["parent_id"]) == (None, asked["id"])
    assert (asked["siblings"], first["siblings"]) == ([asked["id"]], [first["id"]])

    turn = regenerate(http, conversation, first["id"])
    done = finish(http, turn)
    assert done["content"] == take_for(question, 2)
    assert done["parent_id"] == asked["id"]

    now = branch(http, conversation)
    assert contents(now) == [question, take_for(question, 2)]
    assert now[1]["siblings"] == [first["id"], done["id"]]
    assert now[0]["siblings"] == [asked["id"]]
    # The model answered the same message, with nothing of the old reply.
    assert shown_before(provider, question, 2) == []

    # Back to the first version: it is shown, and stays the current branch.
    old = branch(http, conversation, leaf=first["id"])
    assert contents(old) == [question, take_for(question, 1)]
    assert contents(branch(http, conversation)) == [question, take_for(question, 1)]
    assert old[1]["siblings"] == [first["id"], done["id"]]


def test_regenerating_an_earlier_reply_starts_a_branch_the_model_follows(
    http: httpx.Client, provider: FakeProvider
) -> None:
    conversation = new_conversation(http)
    one, two = unique("[nth] one"), unique("two")
    send_and_finish(http, conversation, one)
    send_and_finish(http, conversation, two)
    first_reply = messages(http, conversation)[1]

    finish(http, regenerate(http, conversation, first_reply["id"]))
    assert contents(branch(http, conversation)) == [one, take_for(one, 2)]
    three = unique("three")
    send_and_finish(http, conversation, three)
    # The model is shown the new branch only: not "two", nor the first take.
    assert shown_before(provider, three) == [one, take_for(one, 2)]
    assert contents(branch(http, conversation)) == [one, take_for(one, 2), three, reply_for(three)]

    # The old branch is whole, continued below the first take to its end.
    old = branch(http, conversation, leaf=first_reply["id"])
    assert contents(old) == [one, take_for(one, 1), two, reply_for(two)]
    four = unique("four")
    send_and_finish(http, conversation, four)
    assert shown_before(provider, four) == [one, take_for(one, 1), two, reply_for(two)]


def test_history_shows_the_branch_the_conversation_shows(
    http: httpx.Client, client: httpx.Client
) -> None:
    user = http.headers["X-Parley-User"]
    question = unique("[nth] seed")
    said = client.post("/chat", json={"message": question, "username": user})
    assert said.status_code == 200
    (seed,) = http.get("/api/conversations").json()["conversations"]
    reply = messages(http, seed["id"])[1]
    finish(http, regenerate(http, seed["id"], reply["id"]))
    assert client.get(f"/history/{user}").json() == [
        {"content": question, "isUser": True},
        {"content": take_for(question, 2), "isUser": False},
    ]
    # /chat goes on from the branch shown.
    follow_up = unique("follow-up")
    assert client.post("/chat", json={"message": follow_up, "username": user}).status_code == 200
    assert [m["content"] for m in client.get(f"/history/{user}").json()] == [
        question,
        take_for(question, 2),
        follow_up,
        reply_for(follow_up),
    ]


def test_a_failed_reply_can_be_regenerated(http: httpx.Client, provider: FakeProvider) -> None:
    conversation = new_conversation(http)
    question = unique("[fail-once:400] try me")
    events = list(stream(http, send(http, conversation, question)))
    assert events[-1].event == "error"
    failed = messages(http, conversation)[1]
    assert failed["status"] == "failed"
    done = finish(http, regenerate(http, conversation, failed["id"]))
    assert done["content"] == reply_for(question)
    assert branch(http, conversation)[1]["siblings"] == [failed["id"], done["id"]]


# --- Edit ------------------------------------------------------------------------------


def test_an_edit_is_a_new_version_and_the_model_sees_only_its_branch(
    http: httpx.Client, provider: FakeProvider
) -> None:
    """The issue's test: "my name is Ann" edited to "my name is Bob"; asked for the name,
    the model is sent the Bob branch only."""
    conversation = new_conversation(http)
    ann, asked = unique("my name is Ann"), unique("what is my name?")
    send_and_finish(http, conversation, ann)
    send_and_finish(http, conversation, asked)
    ann_message = messages(http, conversation)[0]

    bob = unique("my name is Bob")
    done = finish(http, edit(http, conversation, ann_message["id"], bob))
    assert done["content"] == reply_for(bob)
    assert shown_before(provider, bob) == []  # the first message: nothing before it
    now = branch(http, conversation)
    assert contents(now) == [bob, reply_for(bob)]
    assert now[0]["siblings"] == [ann_message["id"], now[0]["id"]]
    assert now[0]["parent_id"] is None

    again = unique("what is my name?")
    send_and_finish(http, conversation, again)
    assert shown_before(provider, again) == [bob, reply_for(bob)]

    # The Ann branch, whole, is still there; switched to, the model follows it.
    old = branch(http, conversation, leaf=ann_message["id"])
    assert contents(old) == [ann, reply_for(ann), asked, reply_for(asked)]
    last = unique("and now?")
    send_and_finish(http, conversation, last)
    assert shown_before(provider, last) == [ann, reply_for(ann), asked, reply_for(asked)]


def test_an_edit_in_the_middle_keeps_what_came_before(
    http: httpx.Client, provider: FakeProvider
) -> None:
    conversation = new_conversation(http)
    one, two, three = unique("one"), unique("two"), unique("three")
    for text in (one, two, three):
        send_and_finish(http, conversation, text)
    second = messages(http, conversation)[2]
    edited = unique("two, edited")
    finish(http, edit(http, conversation, second["id"], edited))
    assert shown_before(provider, edited) == [one, reply_for(one)]
    now = branch(http, conversation)
    assert contents(now) == [one, reply_for(one), edited, reply_for(edited)]
    assert now[2]["parent_id"] == now[1]["id"]
    assert now[2]["siblings"] == [second["id"], now[2]["id"]]


def test_pages_of_a_branch_walk_back_along_it(http: httpx.Client) -> None:
    conversation = new_conversation(http)
    texts = [unique(f"m{i}") for i in range(4)]
    for text in texts:
        send_and_finish(http, conversation, text)
    first = messages(http, conversation)[0]
    bob = unique("edited")
    finish(http, edit(http, conversation, messages(http, conversation)[4]["id"], bob))
    # The branch: m0, m1, bob (six messages); pages of two, newest first.
    expected = [texts[0], reply_for(texts[0]), texts[1], reply_for(texts[1]), bob, reply_for(bob)]
    seen: list[str] = []
    before: int | None = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"before": before} if before else {})
        page = http.get(f"/api/conversations/{conversation}/messages", params=params).json()
        seen = contents(page["messages"]) + seen
        if not page["has_more"]:
            break
        before = page["messages"][0]["id"]
    assert seen == expected
    assert page["messages"][0]["id"] == first["id"]


# --- One at a time, exactly once -------------------------------------------------------


def test_parallel_regenerates_and_edits_start_exactly_one_turn(
    http: httpx.Client, server: ParleyServer, provider: FakeProvider
) -> None:
    conversation = new_conversation(http)
    question = unique("[hang] hold on")
    provider.release()
    send_and_finish(http, conversation, question)
    asked, reply = messages(http, conversation)
    provider.hold()
    user = http.headers["X-Parley-User"]

    def attempt(index: int) -> int:
        with as_user(server.client(), user) as own:
            if index % 2:
                path = f"/api/conversations/{conversation}/messages/{reply['id']}/regenerate"
                return own.post(path).status_code
            body = {"content": f"{question} {index}", "replaces": asked["id"]}
            return own.post(f"/api/conversations/{conversation}/messages", json=body).status_code

    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            codes = list(pool.map(attempt, range(20)))
        assert sorted(codes) == [202] + [409] * 19
    finally:
        provider.release()
    # The first pair, and a new reply (a regeneration won) or a new pair (an edit won).
    winner = codes.index(202)
    assert len(stored_all(http, conversation)) == (3 if winner % 2 else 4)
    wait_for(lambda: branch(http, conversation)[-1]["status"] == "complete")


def stored_all(http: httpx.Client, conversation: str) -> list[int]:
    """The ids of every message of the conversation, on any branch."""
    ids: set[int] = set()
    pending = [m["id"] for m in messages(http, conversation)]
    while pending:
        message_id = pending.pop()
        for message in branch(http, conversation, leaf=message_id):
            if message["id"] not in ids:
                ids.add(message["id"])
                pending.extend(message["siblings"])
    return sorted(ids)


def test_an_idempotency_key_returns_the_same_regeneration(
    http: httpx.Client, provider: FakeProvider
) -> None:
    conversation = new_conversation(http)
    question = unique("[nth] keyed")
    send_and_finish(http, conversation, question)
    asked, reply = messages(http, conversation)
    key = unique("key")
    turn = regenerate(http, conversation, reply["id"], **{"Idempotency-Key": key})
    finish(http, turn)
    assert regenerate(http, conversation, reply["id"], **{"Idempotency-Key": key}) == turn
    assert len(provider.calls_for(question)) == 2
    # The same key for anything else is refused, and starts nothing.
    for attempt in (
        lambda: http.post(
            f"/api/conversations/{conversation}/messages",
            json={"content": question},
            headers={"Idempotency-Key": key},
        ),
        lambda: http.post(
            f"/api/conversations/{conversation}/messages",
            json={"content": "other", "replaces": asked["id"]},
            headers={"Idempotency-Key": key},
        ),
    ):
        refused = attempt()
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"][0]["type"] == "idempotency_key_reused"
    edit_key = unique("edit-key")
    edited = unique("edited")
    turn = edit(http, conversation, asked["id"], edited, **{"Idempotency-Key": edit_key})
    finish(http, turn)
    assert edit(http, conversation, asked["id"], edited, **{"Idempotency-Key": edit_key}) == turn
    assert len(provider.calls_for(edited)) == 1
    refused = http.post(
        f"/api/conversations/{conversation}/messages/{reply['id']}/regenerate",
        headers={"Idempotency-Key": edit_key},
    )
    assert refused.status_code == 422


# --- Bad input: a clear 4xx, and nothing changed ----------------------------------------


def test_bad_regenerates_edits_and_leaves_change_nothing(
    http: httpx.Client, client: httpx.Client, provider: FakeProvider
) -> None:
    conversation = new_conversation(http)
    question = unique("bad input")
    send_and_finish(http, conversation, question)
    asked, reply = messages(http, conversation)
    elsewhere = new_conversation(http)
    send_and_finish(http, elsewhere, unique("elsewhere"))
    foreign_asked, foreign_reply = messages(http, elsewhere)
    stranger = httpx.Client(base_url=str(http.base_url), headers={"X-Parley-User": unique()})
    before = (stored(http, conversation), len(provider.calls))

    base = f"/api/conversations/{conversation}"
    post_message = f"{base}/messages"
    cases: list[tuple[httpx.Client, str, str, Any, int]] = [
        (http, "POST", f"{base}/messages/{asked['id']}/regenerate", None, 422),
        (http, "POST", f"{base}/messages/{foreign_reply['id']}/regenerate", None, 404),
        (http, "POST", f"{base}/messages/{2**62}/regenerate", None, 404),
        (http, "POST", f"{base}/messages/0/regenerate", None, 422),
        (http, "POST", f"{base}/messages/-1/regenerate", None, 422),
        (http, "POST", f"{base}/messages/{2**63}/regenerate", None, 422),
        (http, "POST", f"{base}/messages/abc/regenerate", None, 422),
        (http, "POST", f"{base}/messages/1.5/regenerate", None, 422),
        (stranger, "POST", f"{base}/messages/{reply['id']}/regenerate", None, 404),
        (http, "POST", post_message, {"content": "x", "replaces": reply["id"]}, 422),
        (http, "POST", post_message, {"content": "x", "replaces": foreign_asked["id"]}, 422),
        (http, "POST", post_message, {"content": "x", "replaces": 2**62}, 422),
        (http, "POST", post_message, {"content": "x", "replaces": 0}, 422),
        (http, "POST", post_message, {"content": "x", "replaces": 2**63}, 422),
        (http, "POST", post_message, {"content": "x", "replaces": str(asked["id"])}, 422),
        (http, "POST", post_message, {"content": "x", "replaces": True}, 422),
        (http, "POST", post_message, {"content": "x", "replaces": asked["id"] + 0.5}, 422),
        (http, "POST", post_message, {"content": "", "replaces": asked["id"]}, 422),
        (stranger, "POST", post_message, {"content": "x", "replaces": asked["id"]}, 404),
        (http, "GET", f"{post_message}?leaf={foreign_reply['id']}", None, 422),
        (http, "GET", f"{post_message}?leaf={2**62}", None, 422),
        (http, "GET", f"{post_message}?leaf=0", None, 422),
        (http, "GET", f"{post_message}?leaf=abc", None, 422),
        (http, "GET", f"{post_message}?before={foreign_reply['id']}", None, 422),
        (stranger, "GET", f"{post_message}?leaf={reply['id']}", None, 404),
    ]
    for who, method, path, body, status in cases:
        answer = who.request(method, path, json=body)
        assert answer.status_code == status, (path, body, answer.status_code, answer.text)
        assert "detail" in answer.json(), answer.text
    raw = http.post(
        post_message,
        content=b'{"content": "x", "replaces": NaN}',
        headers={"Content-Type": "application/json"},
    )
    assert raw.status_code == 422
    assert (stored(http, conversation), len(provider.calls)) == before
    assert contents(branch(http, elsewhere))[0] == foreign_asked["content"]


def test_a_regenerate_while_a_reply_is_written_is_refused(
    http: httpx.Client, provider: FakeProvider
) -> None:
    conversation = new_conversation(http)
    first = unique("first")
    send_and_finish(http, conversation, first)
    _, reply = messages(http, conversation)
    provider.hold()
    try:
        send(http, conversation, unique("[hang] busy"))
        refused = http.post(f"/api/conversations/{conversation}/messages/{reply['id']}/regenerate")
        assert refused.status_code == 409, refused.text
    finally:
        provider.release()


def test_a_regeneration_can_be_stopped(http: httpx.Client, provider: FakeProvider) -> None:
    conversation = new_conversation(http)
    question = unique("[slow:0.2] " + " ".join(f"w{i}" for i in range(30)))
    send_and_finish(http, conversation, question)
    _, reply = messages(http, conversation)
    turn = regenerate(http, conversation, reply["id"])
    events = []
    for event in stream(http, turn):
        events.append(event)
        if len(events) == 3:
            assert http.post(f"/api/turns/{turn}/cancel").json()["status"] == "stopping"
    assert events[-1].event == "stopped"
    now = branch(http, conversation)
    assert now[1]["status"] == "stopped"
    assert reply_for(question).startswith(now[1]["content"])
    assert now[1]["siblings"] == [reply["id"], now[1]["id"]]


# --- Models and instructions ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_conversations_pick_a_model_and_instructions(
    make_server: Callable[..., ParleyServer],
    database_url: str | None,
    provider: FakeProvider,
) -> None:
    models = [
        {"name": "Second", "base_url": provider.base_url, "api_key": "sk-second", "model": "m2"},
        {"name": "third", "base_url": provider.base_url, "model": "m3"},
    ]
    server = make_server(database_url, PARLEY_MODELS=json.dumps(models)).start()
    with as_user(server.client(), unique("picker")) as http:
        listed = http.get("/api/models")
        assert listed.status_code == 200
        assert listed.json() == [
            {"name": "gpt-3.5-turbo", "default": True},
            {"name": "Second", "default": False},
            {"name": "third", "default": False},
        ]
        assert "sk-second" not in listed.text and provider.base_url not in listed.text

        conversation = new_conversation(http)
        shown = http.get(f"/api/conversations/{conversation}").json()
        assert (shown["model"], shown["system_prompt"]) == (None, None)
        by_default = unique("default model")
        send_and_finish(http, conversation, by_default)
        (call,) = provider.calls_for(by_default)
        assert call.body["model"] == "gpt-3.5-turbo"
        assert call.messages[0]["content"].startswith("You talk like a pirate")

        instructions = "Answer in haiku. 🌸"
        changed = http.patch(
            f"/api/conversations/{conversation}",
            json={"model": "Second", "system_prompt": instructions},
        )
        assert changed.status_code == 200, changed.text
        assert (changed.json()["model"], changed.json()["system_prompt"]) == (
            "Second",
            instructions,
        )
        picked = unique("second model")
        send_and_finish(http, conversation, picked)
        (call,) = provider.calls_for(picked)
        assert call.body["model"] == "m2"
        assert call.authorization == "Bearer sk-second"
        assert call.messages[0] == {"role": "system", "content": instructions}
        # The rest of the conversation is shown as before.
        assert [m["content"] for m in call.messages[1:-1]] == [by_default, reply_for(by_default)]
        # A regenerated reply uses them too.
        reply = messages(http, conversation)[-1]
        finish(http, regenerate(http, conversation, reply["id"]))
        assert provider.calls_for(picked)[1].body["model"] == "m2"

        # Back to the defaults: null, or empty instructions.
        back = http.patch(
            f"/api/conversations/{conversation}", json={"model": None, "system_prompt": " "}
        )
        assert (back.json()["model"], back.json()["system_prompt"]) == (None, None)
        assert back.json()["title"] == by_default  # named after its first message, still
        last = unique("back to default")
        send_and_finish(http, conversation, last)
        (call,) = provider.calls_for(last)
        assert call.body["model"] == "gpt-3.5-turbo"
        assert call.messages[0]["content"].startswith("You talk like a pirate")

        # Listed conversations carry their choices.
        http.patch(f"/api/conversations/{conversation}", json={"model": "third"})
        (listed_one,) = http.get("/api/conversations").json()["conversations"]
        assert listed_one["model"] == "third"


def test_bad_conversation_changes_are_refused_and_change_nothing(
    http: httpx.Client, server: ParleyServer
) -> None:
    conversation = new_conversation(http)
    path = f"/api/conversations/{conversation}"
    original = http.get(path).json()
    limit = 16_000  # PARLEY_MAX_MESSAGE_CHARS, the default
    for body in (
        {},
        {"model": "no-such-model"},
        {"model": ""},
        {"model": 3},
        {"model": ["gpt-3.5-turbo"]},
        {"model": "gpt-3.5-turbo\u0000"},
        {"system_prompt": "x" * (limit + 1)},
        {"system_prompt": "nul \u0000 here"},
        {"system_prompt": 42},
        {"title": None},
        {"title": ""},
        {"colour": "blue"},
        {"title": "fine", "model": "no-such-model"},
    ):
        answer = http.patch(path, json=body)
        assert answer.status_code == 422, (body, answer.text)
    for raw in (b'{"system_prompt": "\\ud800"}', b'{"model": NaN}', b'{"model": 1e999}'):
        answer = http.patch(path, content=raw, headers={"Content-Type": "application/json"})
        assert answer.status_code == 422, (raw, answer.text)
    assert http.get(path).json() == original
    stranger = as_user(server.client(), unique("stranger"))
    assert stranger.patch(path, json={"model": None}).status_code == 404


def test_models_settings_are_checked() -> None:
    from pydantic import ValidationError

    from parley.config import ConfigurationError, Settings

    with pytest.raises(ValidationError, match="name of its own"):
        Settings(models=[{"name": "a", "model": "x"}, {"name": "a", "model": "y"}])
    with pytest.raises(ValidationError):
        Settings(models=[{"name": "", "model": "x"}])
    with pytest.raises(ValidationError):
        Settings(models=[{"name": "a", "model": "x", "colour": "blue"}])
    clash = Settings(openai_base_url="http://127.0.0.1:9/v1", models=[{"name": "gpt-3.5-turbo"}])
    with pytest.raises(ConfigurationError, match="default model's name"):
        clash.check_provider()


# --- Through a crash --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_regeneration_killed_mid_reply_completes_once_on_its_branch(
    make_server: Callable[..., ParleyServer],
    database_url: str | None,
    provider: FakeProvider,
) -> None:
    server = make_server(database_url).start()
    http = as_user(server.client(timeout=60), unique("crash"))
    conversation = new_conversation(http)
    one, two = unique("[hang] [nth] one"), unique("two")
    provider.release()
    send_and_finish(http, conversation, one)
    send_and_finish(http, conversation, two)
    first_reply = messages(http, conversation)[1]

    provider.hold()
    turn = regenerate(http, conversation, first_reply["id"])
    wait_for(lambda: len(provider.calls_for(one)) == 2)
    server.kill()
    provider.release()
    server.start()
    http = as_user(server.client(timeout=60), http.headers["X-Parley-User"])
    done = finish(http, turn)
    # Asked once before the kill and once after; shown only what came before "one".
    assert len(provider.calls_for(one)) == 3
    assert shown_before(provider, one, 3) == []
    assert done["content"] == take_for(one, 3)
    now = branch(http, conversation)
    assert contents(now) == [one, take_for(one, 3)]
    assert now[1]["siblings"] == [first_reply["id"], done["id"]]
    follow_up = unique("after the crash")
    send_and_finish(http, conversation, follow_up)
    assert shown_before(provider, follow_up) == [one, take_for(one, 3)]
    # The old branch is untouched.
    old = branch(http, conversation, leaf=first_reply["id"])
    assert contents(old) == [one, take_for(one, 1), two, reply_for(two)]


def test_a_model_without_a_base_url_goes_to_openai_not_the_default_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unset, the client would read OPENAI_BASE_URL (the default model's provider) and
    send it the other model's key."""
    from parley.config import Settings
    from parley.llm import OPENAI_API_URL, make_chat_model

    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    settings = Settings(models=[{"name": "GPT-4o mini", "api_key": "sk-x", "model": "gpt-4o-mini"}])
    default = make_chat_model(settings)
    other = make_chat_model(settings, choice=settings.models[0])
    assert str(default.root_async_client.base_url).startswith("http://127.0.0.1:9/v1")
    assert str(other.root_async_client.base_url).rstrip("/") == OPENAI_API_URL


def test_switching_branch_while_sending_never_drops_a_sent_message(
    http: httpx.Client, server: ParleyServer
) -> None:
    """Each message sent follows the end of a branch: none may become a version of
    another one sent here, however branch switches interleave with the sends."""
    conversation = new_conversation(http)
    send_and_finish(http, conversation, unique("root"))
    root = messages(http, conversation)[0]
    finish(http, edit(http, conversation, root["id"], unique("other root")))
    tops = [root["id"], messages(http, conversation)[0]["id"]]
    user = http.headers["X-Parley-User"]
    done = False

    def switch() -> int:
        switches = 0
        with as_user(server.client(), user) as own:
            while not done:
                answer = own.get(
                    f"/api/conversations/{conversation}/messages",
                    params={"leaf": tops[switches % 2]},
                )
                assert answer.status_code == 200, answer.text
                switches += 1
        return switches

    sent = [unique(f"sent {i}") for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        switchers = [pool.submit(switch) for _ in range(2)]
        try:
            for text in sent:
                send_and_finish(http, conversation, text)
        finally:
            done = True
        assert all(switcher.result() > 0 for switcher in switchers)
    seen: dict[str, dict[str, Any]] = {}
    for top in tops:
        for message in branch(http, conversation, leaf=top, limit=200):
            seen[message["content"]] = message
    assert set(sent) <= set(seen), "a sent message is on no branch's newest path"
    for text in sent:
        assert seen[text]["siblings"] == [seen[text]["id"]], text
