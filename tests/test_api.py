"""The example's HTTP API, on SQLite and on PostgreSQL, through a running server."""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import pytest

from tests.conftest import ParleyServer, unique
from tests.fake_provider import FakeProvider, reply_for


def chat(client: httpx.Client, username: str, message: str, **headers: str) -> httpx.Response:
    return client.post("/chat", json={"message": message, "username": username}, headers=headers)


def test_chat_returns_the_reply_and_history_keeps_both(client: httpx.Client) -> None:
    user = unique()
    response = chat(client, user, "Where be the treasure?")
    assert response.status_code == 200
    assert response.json() == {"content": reply_for("Where be the treasure?"), "isUser": False}

    assert client.get(f"/history/{user}").json() == [
        {"content": "Where be the treasure?", "isUser": True},
        {"content": reply_for("Where be the treasure?"), "isUser": False},
    ]


def test_history_is_oldest_first_and_per_user(client: httpx.Client) -> None:
    alice, bob = unique("alice"), unique("bob")
    for text in ("one", "two", "three"):
        assert chat(client, alice, text).status_code == 200
    assert chat(client, bob, "bob's only").status_code == 200

    alice_history = client.get(f"/history/{alice}").json()
    assert [m["content"] for m in alice_history if m["isUser"]] == ["one", "two", "three"]
    assert [m["isUser"] for m in alice_history] == [True, False] * 3
    assert client.get(f"/history/{bob}").json()[0]["content"] == "bob's only"


def test_history_of_an_unknown_user_is_empty(client: httpx.Client) -> None:
    assert client.get(f"/history/{unique('nobody')}").json() == []


def test_names_are_matched_exactly(client: httpx.Client) -> None:
    name = unique("Émile Zola ✓")
    assert chat(client, name, "bonjour").status_code == 200
    assert len(client.get(f"/history/{name}").json()) == 2
    assert client.get(f"/history/{name.upper()}").json() == []


def test_the_model_remembers_earlier_turns(client: httpx.Client, provider: FakeProvider) -> None:
    user = unique()
    chat(client, user, f"My parrot is called {user}")
    chat(client, user, f"What is my parrot called, {user}?")

    (call,) = provider.calls_for(f"What is my parrot called, {user}?")
    assert [(m["role"], m["content"]) for m in call.messages] == [
        ("system", "You talk like a pirate. Answer all questions to the best of your ability."),
        ("user", f"My parrot is called {user}"),
        ("assistant", reply_for(f"My parrot is called {user}")),
        ("user", f"What is my parrot called, {user}?"),
    ]


def test_times_reports_cpu_and_wall_clock(client: httpx.Client) -> None:
    chat(client, unique(), "[delay:0.3] slow one")
    times = client.get("/times").json()
    assert times["cpu_time"] > 0
    assert times["wall_clock_time"] >= 0.3
    assert times["turns"] >= 1
    assert times["window_seconds"] == 60


def test_the_page_is_served_with_its_assets(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    assets = re.findall(r'(?:href|src)="(/static/[^"]+)"', page.text)
    assert {a.split("?")[0] for a in assets} >= {"/static/app.js", "/static/style.css"}
    for asset in assets:
        # Versioned URLs: cached for good, a new release changes them.
        assert "?v=" in asset
        response = client.get(asset)
        assert response.status_code == 200
        assert "immutable" in response.headers["cache-control"]
    assert client.get("/static/app.js").headers["cache-control"] == "no-cache"
    # The page's libraries, vendored under their versioned names; nothing comes from a CDN.
    script = client.get("/static/app.js").text
    for library in re.findall(r'from "\./(vendor/[^"]+)"', script):
        response = client.get(f"/static/{library}")
        assert response.status_code == 200
        assert "immutable" in response.headers["cache-control"]
    assert "https://" not in page.text
    assert "http://" not in page.text


def test_usage_has_costs_and_a_series(client: httpx.Client) -> None:
    assert chat(client, unique(), "[delay:0.2] count it").status_code == 200
    usage = client.get("/api/usage").json()
    assert usage["wall_clock_time"] >= 0.2
    assert usage["model_cpu_time"] is None
    costs = usage["costs"]
    assert costs["cpu_billed"] == pytest.approx(usage["cpu_time"] * costs["price_cpu_second"])
    assert costs["duration_billed"] == pytest.approx(
        usage["wall_clock_time"] * costs["price_request_second"]
    )
    assert len(usage["series"]) == 30
    assert usage["series"][-1]["seconds_ago"] == 0
    assert sum(b["wall_clock_time"] for b in usage["series"]) >= 0.2


def test_concurrent_turns_of_one_user_all_land(server: ParleyServer) -> None:
    user = unique()
    texts = [f"message {i}" for i in range(12)]
    with server.client() as http, concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda text: chat(http, user, text), texts))
        history = http.get(f"/history/{user}").json()
    failures = [r.text for r in responses if r.status_code != 200]
    assert failures == []
    assert sorted(m["content"] for m in history if m["isUser"]) == sorted(texts)
    assert len(history) == 24


# --- Idempotency ---------------------------------------------------------------------


def test_same_idempotency_key_gives_one_turn(client: httpx.Client, provider: FakeProvider) -> None:
    user, text = unique(), unique("say it once")
    first = chat(client, user, text, **{"Idempotency-Key": "key-1"})
    second = chat(client, user, text, **{"Idempotency-Key": "key-1"})
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert len(provider.calls_for(text)) == 1
    assert len(client.get(f"/history/{user}").json()) == 2


def test_idempotency_keys_are_per_user(client: httpx.Client) -> None:
    alice, bob = unique("alice"), unique("bob")
    assert chat(client, alice, "alice here", **{"Idempotency-Key": "shared"}).status_code == 200
    response = chat(client, bob, "bob here", **{"Idempotency-Key": "shared"})
    assert response.json()["content"] == reply_for("bob here")
    assert client.get(f"/history/{bob}").json()[0]["content"] == "bob here"


def test_reusing_a_key_for_another_message_is_refused(client: httpx.Client) -> None:
    user = unique()
    assert chat(client, user, "first", **{"Idempotency-Key": "k"}).status_code == 200
    response = chat(client, user, "something else", **{"Idempotency-Key": "k"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert len(client.get(f"/history/{user}").json()) == 2


def test_concurrent_retries_with_one_key_give_one_turn(
    server: ParleyServer, provider: FakeProvider
) -> None:
    user, text = unique(), unique("[delay:0.5] at once")
    with server.client() as http, concurrent.futures.ThreadPoolExecutor(5) as pool:
        responses = list(
            pool.map(lambda _: chat(http, user, text, **{"Idempotency-Key": "same"}), range(5))
        )
        history = http.get(f"/history/{user}").json()
    assert {r.status_code for r in responses} == {200}
    assert len({r.text for r in responses}) == 1
    assert len(history) == 2
    assert len(provider.calls_for(text)) == 1


# --- Provider failures ---------------------------------------------------------------


def test_a_failing_provider_gives_502_keeps_the_message_and_the_next_turn_works(
    client: httpx.Client, provider: FakeProvider
) -> None:
    user, broken, after = unique(), unique("[fail:500] broken"), unique("after the storm")
    response = chat(client, user, broken)
    assert response.status_code == 502
    assert "HTTP 500" in response.json()["detail"]
    assert len(provider.calls_for(broken)) == 3  # the step's attempts

    assert chat(client, user, after).status_code == 200
    assert client.get(f"/history/{user}").json() == [
        {"content": broken, "isUser": True},
        {"content": after, "isUser": True},
        {"content": reply_for(after), "isUser": False},
    ]
    # The model is not shown the unanswered message again.
    (call,) = provider.calls_for(after)
    assert [m["content"] for m in call.messages if m["role"] == "user"] == [after]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[fail:400] bad request", "HTTP 400"),
        # A web page where the provider should be, as from a wrong base URL.
        ("[malformed] hello", "not a chat completion"),
    ],
)
def test_a_failure_that_asking_again_cannot_mend_is_not_retried(
    client: httpx.Client, provider: FakeProvider, text: str, why: str
) -> None:
    text = unique(text)
    response = chat(client, unique(), text)
    assert response.status_code == 502
    assert why in response.json()["detail"]
    assert len(provider.calls_for(text)) == 1


def test_a_passing_provider_fault_is_retried(client: httpx.Client, provider: FakeProvider) -> None:
    user, text = unique(), unique("[fail-once:503] flaky")
    response = chat(client, user, text)
    assert response.status_code == 200
    assert len(provider.calls_for(text)) == 2
    assert len(client.get(f"/history/{user}").json()) == 2


# --- Bad input -----------------------------------------------------------------------

BAD_BODIES = {
    "empty message": ({"message": "", "username": "u"}, "message"),
    "whitespace message": ({"message": " \n\t ", "username": "u"}, "message"),
    "message too long": ({"message": "x" * 16_001, "username": "u"}, "message"),
    "message not a string": ({"message": 42, "username": "u"}, "message"),
    "message null": ({"message": None, "username": "u"}, "message"),
    "message missing": ({"username": "u"}, "message"),
    "username empty": ({"message": "hi", "username": ""}, "username"),
    "username whitespace": ({"message": "hi", "username": "   "}, "username"),
    "username too long": ({"message": "hi", "username": "u" * 65}, "username"),
    "username control char": ({"message": "hi", "username": "a\x07b"}, "username"),
    "username newline": ({"message": "hi", "username": "a\nb"}, "username"),
    "username not a string": ({"message": "hi", "username": ["u"]}, "username"),
    "username missing": ({"message": "hi"}, "username"),
}


@pytest.mark.parametrize("body, field", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_bodies_are_refused_and_change_nothing(
    client: httpx.Client, provider: FakeProvider, body: dict[str, object], field: str
) -> None:
    calls_before = len(provider.calls)
    response = client.post("/chat", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert any(error["loc"][-1] == field for error in detail), detail
    assert len(provider.calls) == calls_before
    name = body.get("username")
    if isinstance(name, str) and name.strip() and len(name) <= 64 and name.isprintable():
        assert client.get(f"/history/{name}").json() == []


def test_a_message_at_the_limit_is_accepted(client: httpx.Client) -> None:
    assert chat(client, unique(), "y" * 16_000).status_code == 200


@pytest.mark.parametrize(
    "raw, content_type",
    [
        (b"{not json", "application/json"),
        (b"", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'"just a string"', "application/json"),
        (b"message=hi&username=u", "application/x-www-form-urlencoded"),
        (b"\xff\xfe", "application/json"),
    ],
)
def test_malformed_bodies_are_422(client: httpx.Client, raw: bytes, content_type: str) -> None:
    response = client.post("/chat", content=raw, headers={"content-type": content_type})
    assert response.status_code == 422
    assert "detail" in response.json()


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
def test_bad_idempotency_keys_are_refused(client: httpx.Client, key: str) -> None:
    user = unique()
    response = chat(client, user, "hello", **{"Idempotency-Key": key})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert client.get(f"/history/{user}").json() == []


@pytest.mark.parametrize("name", ["u" * 65, "a%07b", "%20%20"])
def test_bad_names_in_history_are_422(client: httpx.Client, name: str) -> None:
    assert client.get(f"/history/{name}").status_code == 422


def test_unknown_routes_and_methods(client: httpx.Client) -> None:
    assert client.get("/nope").status_code == 404
    assert client.get("/chat").status_code == 405
    assert client.delete("/history/someone").status_code == 405
