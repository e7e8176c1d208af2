"""Accounts mode: sign-up, sessions, CSRF, and nobody reading another person's chats."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.api_client import routes_of, stream, text_of
from tests.conftest import PARLEY, ParleyServer, free_port, unique
from tests.fake_provider import reply_for

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def accounts_server(
    tmp_path_factory: pytest.TempPathFactory, provider: object
) -> Iterator[ParleyServer]:
    from tests.conftest import QUICK_RETRIES

    running = ParleyServer(
        tmp_path_factory.mktemp("parley-accounts"),
        {
            "OPENAI_BASE_URL": provider.base_url,  # type: ignore[attr-defined]
            "PARLEY_AUTH": "accounts",
            **QUICK_RETRIES,
        },
    ).start()
    yield running
    running.stop()


class Person:
    """A browser-like client: cookies kept, the CSRF cookie echoed on changes."""

    def __init__(self, server: ParleyServer, name: str | None = None) -> None:
        self.name = name or unique("user")
        self.http = server.client()

    def signup(self) -> httpx.Response:
        return self.http.post(
            "/api/auth/signup", json={"username": self.name, "password": PASSWORD}
        )

    def login(self, password: str = PASSWORD) -> httpx.Response:
        return self.http.post("/api/auth/login", json={"username": self.name, "password": password})

    def change(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: object
    ) -> httpx.Response:
        headers = {"X-CSRF-Token": self.http.cookies.get("parley_csrf", ""), **(headers or {})}
        return self.http.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def person(accounts_server: ParleyServer) -> Callable[[], Person]:
    made: list[Person] = []

    def make() -> Person:
        someone = Person(accounts_server)
        assert someone.signup().status_code == 201
        made.append(someone)
        return someone

    yield make  # type: ignore[misc]
    for someone in made:
        someone.http.close()


def test_sign_up_sign_in_and_out(accounts_server: ParleyServer) -> None:
    anne = Person(accounts_server)
    assert anne.http.get("/api/auth/me").status_code == 401
    signed_up = anne.signup()
    assert signed_up.status_code == 201
    assert signed_up.json()["username"] == anne.name
    cookies = signed_up.headers.get_list("set-cookie")
    session_cookie = next(c for c in cookies if c.startswith("parley_session="))
    assert "HttpOnly" in session_cookie and "SameSite=strict" in session_cookie
    assert any(c.startswith("parley_csrf=") and "HttpOnly" not in c for c in cookies)
    assert anne.http.get("/api/auth/me").json()["username"] == anne.name
    assert Person(accounts_server, anne.name).signup().status_code == 409

    stranger = Person(accounts_server, anne.name)
    assert stranger.login("wrong password!").status_code == 401
    nobody = Person(accounts_server, unique("nobody"))
    assert nobody.login().json() == stranger.login("wrong password!").json()

    old_session = anne.http.cookies["parley_session"]
    assert anne.change("POST", "/api/auth/logout").status_code == 204
    assert anne.http.get("/api/auth/me").status_code == 401
    # The old cookie is dead on the server, not just forgotten by the client.
    replay = accounts_server.client()
    replay.cookies.set("parley_session", old_session)
    assert replay.get("/api/auth/me").status_code == 401


def test_signing_in_issues_a_new_session(accounts_server: ParleyServer) -> None:
    bob = Person(accounts_server)
    assert bob.signup().status_code == 201
    first = bob.http.cookies["parley_session"]
    assert bob.login().status_code == 200
    assert bob.http.cookies["parley_session"] != first  # no session fixation


@pytest.mark.parametrize(
    "body",
    [
        {"username": "x", "password": "short"},
        {"username": "", "password": PASSWORD},
        {"username": "x", "password": 12345678},
        {"username": "x"},
    ],
)
def test_bad_credentials_are_refused_clearly(
    accounts_server: ParleyServer, body: dict[str, object]
) -> None:
    with accounts_server.client() as http:
        response = http.post("/api/auth/signup", json=body)
    assert response.status_code == 422
    assert response.json()["detail"]


def test_changes_need_the_csrf_token(person: Callable[[], Person]) -> None:
    carol = person()
    # Reading needs only the session; changing needs the token as well.
    assert carol.http.get("/api/conversations").status_code == 200
    assert carol.http.post("/api/conversations").status_code == 403
    forged = carol.http.post("/api/conversations", headers={"X-CSRF-Token": "forged"})
    assert forged.status_code == 403
    assert carol.http.get("/api/conversations").json()["conversations"] == []
    assert carol.change("POST", "/api/conversations").status_code == 201


def test_nobody_reads_another_persons_chats(person: Callable[[], Person]) -> None:
    owner, other = person(), person()
    conversation = owner.change("POST", "/api/conversations").json()["id"]
    started = owner.change(
        "POST", f"/api/conversations/{conversation}/messages", json={"content": "secret"}
    )
    turn_id = started.json()["turn_id"]
    assert text_of(list(stream(owner.http, turn_id))) == reply_for("secret")
    assert owner.change(
        "POST", "/chat", json={"message": "seed secret", "username": owner.name}
    ).json() == {"content": reply_for("seed secret"), "isUser": False}

    attempts = routes_of(conversation, turn_id)
    for method, path, body in attempts:
        response = other.change(method, path, json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert "secret" not in response.text
    assert other.http.get("/api/conversations").json()["conversations"] == []
    # The example's routes answer only for the caller.
    as_owner = other.change("POST", "/chat", json={"message": "hi", "username": owner.name})
    assert as_owner.status_code == 403
    assert other.http.get(f"/history/{owner.name}").status_code == 403
    assert owner.http.get(f"/history/{owner.name}").json()[0]["content"] == "seed secret"

    # Without a session: nothing, whatever name is claimed.
    with owner.http.__class__(base_url=str(owner.http.base_url)) as anonymous:
        for method, path, body in attempts:
            assert anonymous.request(method, path, json=body).status_code == 401
        headers = {"X-Parley-User": owner.name}
        assert anonymous.get("/api/conversations", headers=headers).status_code == 401
        assert anonymous.get(f"/history/{owner.name}").status_code == 401
        chat = anonymous.post("/chat", json={"message": "hi", "username": owner.name})
        assert chat.status_code == 401


def test_security_headers_on_every_response(accounts_server: ParleyServer) -> None:
    with accounts_server.client() as http:
        for path in ("/", "/static/app.js", "/api/auth/me", "/nowhere"):
            headers = http.get(path).headers
            assert "script-src 'self'" in headers["content-security-policy"]
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"
            assert headers["x-frame-options"] == "DENY"


def test_a_huge_body_is_refused_before_it_is_read(person: Callable[[], Person]) -> None:
    dana = person()
    conversation = dana.change("POST", "/api/conversations").json()["id"]
    huge = {"content": "x" * 2_000_000}
    response = dana.change("POST", f"/api/conversations/{conversation}/messages", json=huge)
    assert response.status_code == 413
    assert dana.http.get(f"/api/conversations/{conversation}/messages").json()["messages"] == []


def test_open_mode_will_not_listen_publicly(tmp_path_factory: pytest.TempPathFactory) -> None:
    port = free_port()
    command = [str(PARLEY), "serve", "--host", "0.0.0.0", "--port", str(port)]
    command += ["--data-dir", str(tmp_path_factory.mktemp("public"))]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PARLEY_AUTH")}
    env["OPENAI_BASE_URL"] = "http://127.0.0.1:9/v1"
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode != 0
    assert "PARLEY_AUTH=accounts" in refused.stderr
    assert "--insecure-open" in refused.stderr

    # Told it is meant, it serves, and warns.
    allowed = subprocess.Popen(
        [*command, "--insecure-open"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert allowed.poll() is None, allowed.stderr.read() if allowed.stderr else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        allowed.terminate()
        _, errors = allowed.communicate(timeout=30)
    assert "anyone who can reach" in errors


def test_api_tokens_for_scripts(
    person: Callable[[], Person], accounts_server: ParleyServer
) -> None:
    erin = person()
    made = erin.change("POST", "/api/auth/tokens", json={"name": "backup script"})
    assert made.status_code == 201
    token = made.json()["token"]
    listed = erin.http.get("/api/auth/tokens").json()
    assert [t["name"] for t in listed] == ["backup script"]
    assert all(t["token"] is None for t in listed)  # shown once, never again

    with accounts_server.client() as script:
        script.headers["Authorization"] = f"Bearer {token}"
        assert script.get("/api/auth/me").json()["username"] == erin.name
        # A bearer token needs no CSRF token: no cookie is involved.
        conversation = script.post("/api/conversations")
        assert conversation.status_code == 201
        assert erin.change("DELETE", f"/api/auth/tokens/{made.json()['id']}").status_code == 204
        assert script.get("/api/auth/me").status_code == 401
        assert script.get("/api/conversations").status_code == 401
    other = person()
    assert other.change("DELETE", f"/api/auth/tokens/{made.json()['id']}").status_code == 404


def test_the_admin_closes_sign_up_and_removes_users(
    make_server: Callable[..., ParleyServer],
) -> None:
    server = make_server(PARLEY_AUTH="accounts").start()
    admin, member = Person(server), Person(server)
    assert admin.signup().json()["is_admin"] is True
    assert member.signup().json()["is_admin"] is False
    member_conversation = member.change("POST", "/api/conversations").json()["id"]
    token = member.change("POST", "/api/auth/tokens", json={"name": "t"}).json()["token"]

    assert member.change("PUT", "/api/admin/signup", json={"signup": False}).status_code == 403
    assert member.change("DELETE", f"/api/admin/users/{admin.name}").status_code == 403
    assert admin.change("PUT", "/api/admin/signup", json={"signup": False}).status_code == 200
    assert Person(server).signup().status_code == 403
    assert admin.http.get("/api/auth/signup").json() == {"signup": False}
    assert [u["username"] for u in admin.http.get("/api/admin/users").json()] == [
        admin.name,
        member.name,
    ]

    assert admin.change("DELETE", f"/api/admin/users/{member.name}").status_code == 204
    # The member's live session and token end at once; their chats are gone.
    assert member.http.get("/api/auth/me").status_code == 401
    with server.client() as script:
        script.headers["Authorization"] = f"Bearer {token}"
        assert script.get("/api/auth/me").status_code == 401
    assert admin.change("DELETE", f"/api/admin/users/{member.name}").status_code == 404
    assert admin.change("DELETE", f"/api/admin/users/{admin.name}").status_code == 409
    assert Person(server, member.name).login().status_code == 401
    assert admin.http.get(f"/api/conversations/{member_conversation}").status_code == 404


def test_rate_limits(make_server: Callable[..., ParleyServer]) -> None:
    server = make_server(
        PARLEY_AUTH="accounts",
        PARLEY_TURNS_PER_MINUTE="3",
        PARLEY_CONCURRENT_TURNS="1",
        PARLEY_SIGN_IN_FAILURES_PER_ACCOUNT="3",
    ).start()
    fred = Person(server)
    assert fred.signup().status_code == 201
    conversations = [fred.change("POST", "/api/conversations").json()["id"] for _ in range(3)]

    def start(conversation: str, text: str) -> httpx.Response:
        return fred.change(
            "POST", f"/api/conversations/{conversation}/messages", json={"content": text}
        )

    slow = start(conversations[0], "[slow:0.1] " + "w " * 20)
    assert slow.status_code == 202
    busy = start(conversations[1], "at the same time")
    assert busy.status_code == 429
    assert "at once" in busy.json()["detail"]
    assert int(busy.headers["retry-after"]) > 0
    list(stream(fred.http, slow.json()["turn_id"]))
    for text in ("two", "three"):
        turn = start(conversations[1], text)
        assert turn.status_code == 202
        list(stream(fred.http, turn.json()["turn_id"]))
    fourth = start(conversations[2], "four")
    assert fourth.status_code == 429
    assert "a minute" in fourth.json()["detail"]

    for _ in range(3):
        assert fred.login("wrong password!").status_code == 401
    locked = fred.login()  # even the right password, for a while
    assert locked.status_code == 429
    assert int(locked.headers["retry-after"]) > 0


def test_idempotency_keys_are_per_user(person: Callable[[], Person]) -> None:
    owner, other = person(), person()
    mine = owner.change("POST", "/api/conversations").json()["id"]
    theirs = other.change("POST", "/api/conversations").json()["id"]
    key = {"Idempotency-Key": "same-key"}
    first = owner.change(
        "POST", f"/api/conversations/{mine}/messages", json={"content": "mine"}, headers=key
    )
    list(stream(owner.http, first.json()["turn_id"]))
    # The same key from someone else is their own turn, not a view of the owner's.
    second = other.http.post(
        f"/api/conversations/{theirs}/messages",
        json={"content": "theirs"},
        headers={**key, "X-CSRF-Token": other.http.cookies["parley_csrf"]},
    )
    assert second.status_code == 202
    assert second.json()["turn_id"] != first.json()["turn_id"]
    assert other.http.get(f"/api/turns/{first.json()['turn_id']}/stream").status_code == 404


def test_secrets_stay_out_of_logs_errors_and_the_page(
    make_server: Callable[..., ParleyServer],
) -> None:
    secret_key = "sk-test-" + unique("do-not-leak")
    server = make_server(
        PARLEY_AUTH="accounts", OPENAI_API_KEY=secret_key, PARLEY_LOG_LEVEL="debug"
    ).start()
    someone = Person(server)
    someone.signup()
    conversation = someone.change("POST", "/api/conversations").json()["id"]
    turn = someone.change(
        "POST", f"/api/conversations/{conversation}/messages", json={"content": "[fail:401] no"}
    )
    events = list(stream(someone.http, turn.json()["turn_id"]))
    session_secret = (server.data_dir / "session-secret").read_text().strip()
    seen = [
        server.log(),
        someone.http.get("/").text,
        someone.http.get("/readyz").text,
        someone.http.get("/openapi.json").text,
        repr(events),
    ]
    server.stop()
    seen.append(server.log())
    for text in seen:
        assert secret_key not in text
        assert session_secret not in text
    assert oct((server.data_dir / "session-secret").stat().st_mode & 0o777) == "0o600"
