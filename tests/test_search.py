"""Searching one's messages (``GET /api/search``), through a running server, on SQLite
and on PostgreSQL."""

from __future__ import annotations

import random
import sqlite3
import string
from typing import Any

import httpx
import pytest

from parley.search import snippet
from tests.api_client import as_user, messages, new_conversation, send_and_finish, stream
from tests.conftest import ParleyServer, unique
from tests.fake_provider import reply_for, take_for


def word() -> str:
    """A word no other test writes (letters only: the index splits on anything else)."""
    return "zq" + "".join(random.choices(string.ascii_lowercase, k=10))


def found(http: httpx.Client, q: str, **params: Any) -> list[dict[str, Any]]:
    answer = http.get("/api/search", params={"q": q, **params})
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def texts(results: list[dict[str, Any]]) -> list[str]:
    return [r["snippet"].replace("<mark>", "").replace("</mark>", "") for r in results]


@pytest.fixture
def http(client: httpx.Client) -> httpx.Client:
    return as_user(client, unique("seeker"))


def test_words_in_any_order_any_case_any_accents_and_a_prefix(http: httpx.Client) -> None:
    name = word()
    conversation = new_conversation(http)
    said = f"Le café de {name.capitalize()} est très bon"
    send_and_finish(http, conversation, said)
    other = f"{name} drinks tea"
    send_and_finish(http, conversation, other)

    for query in (
        f"cafe {name}",  # no accent asked, one stored
        f"{name.upper()} CAFÉ",  # any case, any order
        f"TRES {name}",
        f"{name} caf",  # the last word as a prefix
    ):
        results = found(http, query)
        assert said in texts(results), query
        # Both of the user's words, and the model's echo of them.
        assert {r["role"] for r in results} == {"user", "assistant"}, query
    # Words are runs of letters and digits, whatever joins them.
    joined = f"see {name}-101 at mail.{name}.example.com or v2.5_beta"
    send_and_finish(http, conversation, joined)
    for query in (f"{name} 101", f"{name} example com", "v2 5 beta", f"{name}-101"):
        assert joined in texts(found(http, query)), query
    assert found(http, f"caf {name}") == []  # only the last word is a prefix
    assert found(http, f"{name} coffee") == []  # every word is needed
    (hit,) = [r for r in found(http, f"{name} tea") if r["role"] == "user"]
    assert hit["conversation_id"] == conversation
    assert hit["title"] == said
    assert hit["message_id"] == messages(http, conversation)[2]["id"]
    assert hit["snippet"] == f"<mark>{name}</mark> drinks <mark>tea</mark>"


def test_the_best_match_comes_first(http: httpx.Client) -> None:
    name = word()
    conversation = new_conversation(http)
    filler = " ".join(word() for _ in range(60))
    send_and_finish(http, conversation, f"once {name} in a long message: {filler}")
    send_and_finish(http, conversation, f"{name} {name} {name}")
    results = found(http, name)
    users = [r for r in results if r["role"] == "user"]
    assert texts(users)[0] == f"{name} {name} {name}"
    assert len(users) == 2


def test_only_the_callers_messages_are_found(client: httpx.Client) -> None:
    name = word()
    ann = as_user(client, unique("ann"))
    bob = as_user(httpx.Client(base_url=client.base_url), unique("bob"))
    send_and_finish(ann, new_conversation(ann), f"{name} belongs to ann")
    assert found(bob, name) == []
    assert found(bob, f"{name} belongs") == []
    assert len(found(ann, name)) == 2


def test_a_reply_is_found_once_finished_and_a_deleted_conversation_never(
    http: httpx.Client,
) -> None:
    name = word()
    conversation = new_conversation(http)
    said = f"[slow:0.2] {name} " + "word " * 30
    turn = http.post(f"/api/conversations/{conversation}/messages", json={"content": said})
    assert turn.status_code == 202
    events = stream(http, turn.json()["turn_id"])
    for event in events:
        if event.event == "token":
            break
    # The reply is being written: only the user's message holds the word yet.
    assert [r["role"] for r in found(http, name)] == ["user"]
    for _ in events:
        pass
    assert sorted(r["role"] for r in found(http, name)) == ["assistant", "user"]

    assert http.delete(f"/api/conversations/{conversation}").status_code == 204
    assert found(http, name) == []


def test_pages_hold_every_match_once(http: httpx.Client) -> None:
    name = word()
    conversation = new_conversation(http)
    for i in range(12):
        send_and_finish(http, conversation, f"{name} number {i}")
    seen: list[int] = []
    offset: int | None = 0
    pages = 0
    while offset is not None:
        answer = http.get("/api/search", params={"q": name, "limit": 5, "offset": offset})
        assert answer.status_code == 200
        page = answer.json()
        assert len(page["results"]) <= 5
        seen += [r["message_id"] for r in page["results"]]
        offset = page["next_offset"]
        pages += 1
    assert pages == 5 and len(seen) == 24 and len(set(seen)) == 24


def test_a_result_on_another_branch_opens_that_branch(http: httpx.Client) -> None:
    name = word()
    conversation = new_conversation(http)
    question = f"[nth] {name} question"
    send_and_finish(http, conversation, question)
    _asked, first = messages(http, conversation)
    again = http.post(f"/api/conversations/{conversation}/messages/{first['id']}/regenerate")
    assert again.status_code == 202
    list(stream(http, again.json()["turn_id"]))
    assert messages(http, conversation)[1]["content"] == take_for(question, 2)

    (hit,) = found(http, f"{name} take 1")
    assert hit["message_id"] == first["id"]
    shown = http.get(
        f"/api/conversations/{conversation}/messages", params={"leaf": hit["message_id"]}
    ).json()["messages"]
    assert [m["content"] for m in shown] == [question, take_for(question, 1)]


def test_odd_queries_are_refused_or_answered_never_failed(http: httpx.Client) -> None:
    name = word()
    send_and_finish(http, new_conversation(http), f"{name} said AND and OR and NEAR")
    for params in (
        {},
        {"q": ""},
        {"q": "!!! ??? ..."},
        {"q": "_"},
        {"q": "x" * 201},
        {"q": name, "limit": 0},
        {"q": name, "limit": 51},
        {"q": name, "limit": "ten"},
        {"q": name, "limit": "NaN"},
        {"q": name, "offset": -1},
        {"q": name, "offset": 1001},
        {"q": name, "offset": 10**30},
        {"q": "\ufeff\u200b"},
    ):
        answer = http.get("/api/search", params=params)
        assert answer.status_code == 422, (params, answer.text)
    # What would be query syntax to either database is only words.
    for q in (
        f'"{name}" OR NEAR(',
        f"{name} AND",
        f"{name}*",
        f"{name}:*",
        f"{name} & !said",
        f"owner : o00 {name}",
        f"{name}'); DROP TABLE messages; --",
        f"{name} \x00 said",
    ):
        answer = http.get("/api/search", params={"q": q})
        assert answer.status_code in (200, 422), (q, answer.text)
        if answer.status_code == 200:
            assert all(r["role"] in ("user", "assistant") for r in answer.json()["results"])
    # Bytes that are no UTF-8 (a lone surrogate's, a lone continuation byte).
    for raw in ("%ED%A0%80", "%80", "%FF%FE"):
        answer = http.get(f"/api/search?q={name}%20{raw}")
        assert answer.status_code in (200, 422), (raw, answer.text)
        assert http.get(f"/api/search?q={raw}").status_code == 422
    assert len(found(http, f"{name} AND")) == 2
    assert found(http, f"owner o00 {name}") == []


def test_snippets_escape_the_text_and_mark_only_matches(http: httpx.Client) -> None:
    name = word()
    said = f"<b>{name}</b> & <script>alert(1)</script>"
    send_and_finish(http, new_conversation(http), said)
    (hit,) = [r for r in found(http, name) if r["role"] == "user"]
    assert hit["snippet"] == (
        f"&lt;b&gt;<mark>{name}</mark>&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;"
    )
    assert reply_for(said)  # the echo is escaped the same way
    (echo,) = [r for r in found(http, name) if r["role"] == "assistant"]
    assert "<script>" not in echo["snippet"]


def test_on_sqlite_a_deleted_messages_words_leave_the_index(
    make_server: Any,
) -> None:
    server: ParleyServer = make_server().start()
    http = as_user(server.client(), unique("forgetter"))
    name = word()
    conversation = new_conversation(http)
    send_and_finish(http, conversation, f"{name} is a secret")
    assert _index_holds(server, name)
    assert http.delete(f"/api/conversations/{conversation}").status_code == 204
    assert not _index_holds(server, name)


def _index_holds(server: ParleyServer, text: str) -> bool:
    needle = text.encode()
    for path in server.data_dir.glob("*.sqlite"):
        with sqlite3.connect(path) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            if "message_search_data" not in tables:
                continue
            for (block,) in conn.execute("SELECT block FROM message_search_data"):
                if block and needle in bytes(block):
                    return True
    return False


# --- The snippet, on its own ------------------------------------------------------------


def test_a_snippet_marks_whole_words_and_the_last_as_a_prefix() -> None:
    assert snippet("Crème brûlée, CRÈME anglaise", ["creme", "brul"]) == (
        "<mark>Crème</mark> <mark>brûlée</mark>, <mark>CRÈME</mark> anglaise"
    )
    # Only the last word is a prefix; a word inside another is no match.
    assert snippet("cremes creme", ["creme", "x"]) == "cremes <mark>creme</mark>"
    assert (
        snippet("a <b>&</b> b", ["b"])
        == "a &lt;<mark>b</mark>&gt;&amp;&lt;/<mark>b</mark>&gt; <mark>b</mark>"
    )


def test_a_long_snippet_is_cut_around_the_first_match() -> None:
    words = [f"w{i}" for i in range(100)]
    text = " ".join(words)
    cut = snippet(text, ["w50"])
    assert cut.startswith("…w44 ") and cut.endswith(" w67…")
    assert "<mark>w50</mark>" in cut
    assert snippet(text, ["w2"]).startswith("w0 w1 <mark>w2</mark>")
    assert snippet(text, ["w99"]).endswith("<mark>w99</mark>")
    assert snippet(text, ["w99"]).startswith("…w76 ")
    # No match in the text held (a match past what is read): its start.
    assert snippet(text, ["zz"]).startswith("w0 w1")
