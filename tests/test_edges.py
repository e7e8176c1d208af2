"""Integrity at the edges: bad input refused cleanly, security headers on every answer, host
names checked in open mode, the API docs served from the package, the page's ``?c=``
checked, provider keys kept out of errors and logs, private data files, an honest
``/readyz``."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, expect

from parley import app as parley_app
from parley.app import CONTENT_SECURITY_POLICY, SecurityHeaders, create_app
from parley.config import Settings
from tests.api_client import as_user, messages, new_conversation, send, stream
from tests.conftest import BACKENDS, ParleyServer, unique
from tests.fake_provider import FakeProvider
from tests.test_web import Watched, sign_in

SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.status_code)


def detail_names(response: httpx.Response, *location: object) -> bool:
    detail = response.json()["detail"]
    return any(entry["loc"][: len(location)] == list(location) for entry in detail)


# --- Bad input: a clear 422 naming the field, nothing stored, no traceback -----------


@pytest.fixture
def anne(client: httpx.Client) -> httpx.Client:
    return as_user(client, unique("anne"))


# id: (route, raw JSON body, the field the answer must name). Raw, since no JSON library
# writes NaN or a lone surrogate the way a hostile client can. "@" stands for the name.
CHAT = '"username": "@"'
BAD_BODIES = {
    "chat, surrogate message": ("chat", f'{{"message": "\\ud800", {CHAT}}}', "message"),
    "chat, surrogate name": ("chat", '{"message": "hi", "username": "\\udfff"}', "username"),
    "chat, NUL": ("chat", f'{{"message": "a\\u0000b", {CHAT}}}', "message"),
    "chat, NaN message": ("chat", f'{{"message": NaN, {CHAT}}}', "message"),
    "chat, NaN ignored": ("chat", f'{{"message": "hi", {CHAT}, "x": NaN}}', "x"),
    "chat, Infinity nested": (
        "chat",
        f'{{"message": "hi", {CHAT}, "x": [{{"y": Infinity}}]}}',
        "x",
    ),
    "chat, -Infinity": ("chat", f'{{"message": -Infinity, {CHAT}}}', "message"),
    "chat, 1e999": ("chat", f'{{"message": 1e999, {CHAT}}}', "message"),
    "chat, surrogate key": ("chat", f'{{"message": "hi", {CHAT}, "\\ud800": 1}}', "\ufffd"),
    "new, surrogate title": ("new", '{"title": "\\ud800"}', "title"),
    "new, NUL title": ("new", '{"title": "a\\u0000"}', "title"),
    "new, NaN title": ("new", '{"title": NaN}', "title"),
    "new, surrogate key": ("new", '{"\\ud800": "x"}', "\ufffd"),
    "message, surrogate": ("messages", '{"content": "ahoy \\ud83d"}', "content"),
    "message, NUL": ("messages", '{"content": "ahoy\\u0000"}', "content"),
    "message, 1e999": ("messages", '{"content": 1e999}', "content"),
    "message, Infinity": ("messages", '{"content": Infinity}', "content"),
    "rename, surrogate": ("rename", '{"title": "\\udc00"}', "title"),
    "rename, -Infinity": ("rename", '{"title": -Infinity}', "title"),
}


@pytest.mark.parametrize("route, raw, field", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_json_is_refused_naming_the_field_and_stores_nothing(
    server: ParleyServer,
    anne: httpx.Client,
    provider: FakeProvider,
    route: str,
    raw: str,
    field: str,
) -> None:
    name = anne.headers["X-Parley-User"]
    conversation = new_conversation(anne)
    method, path = {
        "chat": ("POST", "/chat"),
        "new": ("POST", "/api/conversations"),
        "messages": ("POST", f"/api/conversations/{conversation}/messages"),
        "rename": ("PATCH", f"/api/conversations/{conversation}"),
    }[route]
    calls, log_size = len(provider.calls), len(server.log())
    before = anne.get("/api/conversations").json()

    response = anne.request(
        method,
        path,
        content=raw.replace('"@"', f'"{name}"').encode(),
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 422, response.text
    assert detail_names(response, "body", field), response.text
    assert_security_headers(response)
    assert anne.get("/api/conversations").json() == before
    assert messages(anne, conversation) == []
    assert anne.get(f"/history/{name}").json() == []
    assert len(provider.calls) == calls
    assert "Traceback" not in server.log()[log_size:]


@pytest.mark.parametrize(
    "query, field",
    [
        ("messages?before=9223372036854775808", "before"),  # 2**63
        (f"messages?before={2**70}", "before"),
        ("conversations?before=0001-01-01T00:00:00%2B14:00", "before"),
        ("conversations?before=9999-12-31T23:59:59-14:00", "before"),
    ],
)
def test_out_of_range_query_values_are_refused(
    server: ParleyServer, anne: httpx.Client, query: str, field: str
) -> None:
    conversation = new_conversation(anne)
    path = f"/api/conversations/{conversation}/messages" + query.removeprefix("messages")
    if query.startswith("conversations"):
        path = "/api/" + query
    log_size = len(server.log())
    response = anne.get(path)
    assert response.status_code == 422, response.text
    assert detail_names(response, "query", field), response.text
    assert "Traceback" not in server.log()[log_size:]


def test_a_time_with_an_offset_pages_as_the_same_instant(anne: httpx.Client) -> None:
    conversation = new_conversation(anne)
    listed = anne.get("/api/conversations").json()["conversations"]
    updated = datetime.fromisoformat(listed[0]["updated_at"].replace("Z", "+00:00"))

    def before(moment: datetime, hours: int) -> list[str]:
        local = moment.astimezone(timezone(timedelta(hours=hours))).isoformat()
        page = anne.get("/api/conversations", params={"before": local})
        assert page.status_code == 200, page.text
        return [c["id"] for c in page.json()["conversations"]]

    # A second later, written at -14:00, is later; a second earlier at +14:00 is earlier.
    assert before(updated + timedelta(seconds=1), -14) == [conversation]
    assert before(updated - timedelta(seconds=1), 14) == []
    # Without an offset, a time is UTC.
    naive = (updated + timedelta(seconds=1)).replace(tzinfo=None).isoformat()
    assert anne.get("/api/conversations", params={"before": naive}).json()["conversations"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_accounts_refuse_text_no_database_can_hold(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    server = make_server(database_url, PARLEY_AUTH="accounts").start()
    with server.client() as http:
        name = unique("sailor")
        for raw, field in [
            (f'{{"username": "{name}", "password": "long enough \\ud800"}}', "password"),
            (f'{{"username": "{name}\\ud800", "password": "long enough"}}', "username"),
            (f'{{"username": "{name}", "password": NaN}}', "password"),
        ]:
            response = http.post(
                "/api/auth/signup", content=raw, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 422, response.text
            assert detail_names(response, "body", field), response.text
        signed_up = http.post(
            "/api/auth/signup", json={"username": name, "password": "long enough"}
        )
        assert signed_up.status_code == 201
        http.headers["X-CSRF-Token"] = http.cookies["parley_csrf"]
        for raw in ['{"name": "ci\\u0000"}', '{"name": "ci\\udbff"}', '{"name": 1e999}']:
            response = http.post(
                "/api/auth/tokens", content=raw, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 422, response.text
            assert detail_names(response, "body", "name"), response.text
        assert http.get("/api/auth/tokens").json() == []
    assert "Traceback" not in server.log()


# --- Security headers on every answer, FastAPI's outer layers' too --------------------


def test_a_body_too_large_gets_the_security_headers(
    make_server: Callable[..., ParleyServer],
) -> None:
    server = make_server().start()
    with as_user(server.client(), unique()) as http:
        response = http.post("/api/conversations", content=b"x" * 300_000)
    assert response.status_code == 413
    assert_security_headers(response)


def test_a_server_error_gets_the_security_headers() -> None:
    app = create_app(Settings(_env_file=None))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a route that fails")

    assert isinstance(app.build_middleware_stack(), SecurityHeaders)
    # No lifespan (no `with`): the route needs none.
    client = TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
    response = client.get("/boom")
    assert response.status_code == 500
    assert_security_headers(response)


# --- Host names (DNS rebinding) --------------------------------------------------------


def test_host_names_are_read_without_their_port() -> None:
    host_name = parley_app.host_name
    assert host_name("LocalHost:8000") == "localhost"
    assert host_name("[::1]:8000") == "[::1]"
    assert host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("example.com.:80") == "example.com"


def _get(server: ParleyServer, host: str, path: str = "/api/conversations") -> httpx.Response:
    return httpx.get(server.url + path, headers={"Host": host, "X-Parley-User": "anne"}, timeout=30)


def test_open_mode_answers_only_loopback_names(
    make_server: Callable[..., ParleyServer],
) -> None:
    server = make_server().start()
    port = server.port
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "127.3.2.1", "[::1]:8000",
                 "parley.localhost", "LOCALHOST."):  # fmt: skip
        assert _get(server, host).status_code == 200, host
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io",
                 "localhost.attacker.example", "0.0.0.0", "[::2]", ""):  # fmt: skip
        refused = _get(server, host)
        assert refused.status_code == 400, host
        assert "PARLEY_ALLOWED_HOSTS" in refused.json()["detail"]
        assert_security_headers(refused)
    assert _get(server, "attacker.example", "/").status_code == 400


def test_allowed_hosts_adds_names(make_server: Callable[..., ParleyServer]) -> None:
    server = make_server(PARLEY_ALLOWED_HOSTS="chat.example.org, *.corp.example").start()
    for host in ("chat.example.org", "Chat.Example.Org:443", "a.corp.example", "localhost"):
        assert _get(server, host).status_code == 200, host
    for host in ("example.org", "corp.example", "attacker.example"):
        assert _get(server, host).status_code == 400, host


def test_accounts_mode_answers_any_name_unless_told(
    make_server: Callable[..., ParleyServer],
) -> None:
    anywhere = make_server(PARLEY_AUTH="accounts").start()
    assert _get(anywhere, "chat.example.org", "/healthz").status_code == 200
    listed = make_server(PARLEY_AUTH="accounts", PARLEY_ALLOWED_HOSTS="chat.example.org").start()
    assert _get(listed, "chat.example.org", "/healthz").status_code == 200
    assert _get(listed, "localhost", "/healthz").status_code == 200
    assert _get(listed, "attacker.example", "/healthz").status_code == 400


# --- The browser: /docs from the package, ?c= checked ------------------------------------


# Every Content-Security-Policy violation the page reports, kept where the test reads it.
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__violations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""


def test_the_api_docs_render_from_the_package_under_the_policy(
    browser: Browser, make_server: Callable[..., ParleyServer]
) -> None:
    server = make_server().start()
    with server.client() as http:
        docs = http.get("/docs")
        assert docs.status_code == 200
        assert_security_headers(docs)
        assert "https://" not in docs.text and "<script>" not in docs.text
        assert http.get("/redoc").status_code == 404
        operations = sum(
            len(methods) for methods in http.get("/openapi.json").json()["paths"].values()
        )
    context = browser.new_context()
    context.add_init_script(RECORD_VIOLATIONS)
    page = context.new_page()
    watched = Watched(page, server.url)
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    try:
        page.goto(f"{server.url}/docs")
        expect(page.locator(".opblock")).to_have_count(operations, timeout=20_000)
        expect(page.locator(".opblock-summary-path").first).to_be_visible()
        # An operation opens, and runs from the page ("Try it out").
        healthz = page.locator("#operations-operations-healthz_healthz_get")
        healthz.locator(".opblock-summary").click()
        healthz.get_by_role("button", name="Try it out").click()
        healthz.get_by_role("button", name="Execute").click()
        expect(healthz.locator(".live-responses-table td.response-col_status").last).to_have_text(
            "200"
        )
        page.wait_for_load_state("networkidle")
        assert watched.foreign_requests == []
        assert page.evaluate("window.__violations") == []
        assert not [line for line in console if "Content Security Policy" in line], console
        assert watched.errors == []
    finally:
        context.close()


@pytest.mark.parametrize(
    "crafted",
    ["../../times?x=", "..%2F..%2Fapi%2Fauth%2Ftokens%3Fx%3D", "x/../../../history/anne#"],
)
def test_the_page_opens_only_a_conversation_id_from_the_url(
    browser: Browser, make_server: Callable[..., ParleyServer], crafted: str
) -> None:
    server = make_server().start()
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    paths: list[str] = []
    page.on("request", lambda request: paths.append(urlsplit(request.url).path))
    try:
        sign_in(page, server)  # a name on file, then the crafted link
        paths.clear()
        page.goto(f"{server.url}/?c={crafted}")
        expect(page.locator("#who")).not_to_be_empty()
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(300)
        called = {path for path in paths if not path.startswith("/static/")}
        allowed = {"/", "/api/auth/me", "/api/conversations", "/api/models", "/api/usage"}
        assert called <= allowed, called
    finally:
        context.close()


# --- Provider keys never reach a client or the log --------------------------------------


@pytest.mark.parametrize("key", ["sk-test-" + "k3y" * 8, "a-local-server-key-" + "x7" * 6])
def test_a_provider_error_that_echoes_the_key_is_redacted(
    make_server: Callable[..., ParleyServer], key: str
) -> None:
    server = make_server(OPENAI_API_KEY=key).start()
    seen = []
    with as_user(server.client(), unique()) as http:
        refused = http.post(
            "/chat", json={"message": "[echo-key:400] hi", "username": unique("chat")}
        )
        assert refused.status_code == 502
        assert "[redacted]" in refused.json()["detail"]
        seen.append(refused.text)
        conversation = new_conversation(http)
        # Refused (400) in one attempt; a 500 is retried, and each retry is logged with
        # the error's text.
        for text in ("[echo-key:400] stream", "[echo-key:500] again"):
            events = list(stream(http, send(http, conversation, text)))
            assert events[-1].event == "error"
            seen.append(repr(events))
        seen.append(repr(messages(http, conversation)))
    server.stop()
    seen.append(server.log())
    assert "Step being automatically retried" in server.log()  # the 500's retries were logged
    for text in seen:
        assert key not in text
        assert key[-12:] not in text


# --- Data files readable by their owner only ---------------------------------------------


def test_data_files_are_private(make_server: Callable[..., ParleyServer]) -> None:
    server = make_server(PARLEY_AUTH="accounts")
    # As an earlier version left them: the directory and a file readable by everyone.
    server.data_dir.mkdir(parents=True, exist_ok=True)
    server.data_dir.chmod(0o755)
    old_log = server.data_dir / "model-server.log"
    old_log.write_text("from an earlier run\n")
    old_log.chmod(0o644)
    server.start()
    with server.client() as http:
        assert (
            http.post(
                "/api/auth/signup", json={"username": unique(), "password": "long enough"}
            ).status_code
            == 201
        )

    def modes() -> dict[str, int]:
        found = {".": stat.S_IMODE(server.data_dir.stat().st_mode)}
        for path in server.data_dir.iterdir():
            found[path.name] = stat.S_IMODE(path.stat().st_mode)
        return found

    running = modes()
    assert {"parley.sqlite", "dbos.sqlite", "session-secret", "server.log"} <= set(running)
    assert running == {name: 0o700 if name == "." else 0o600 for name in running}, {
        name: oct(mode) for name, mode in running.items()
    }
    server.stop()
    stopped = modes()
    assert stopped == {name: 0o700 if name == "." else 0o600 for name in stopped}
    assert os.stat(server.data_dir).st_uid == os.getuid()


# --- /readyz: ready only when the provider answers /models with 2xx ------------------------


def test_readyz_is_not_ready_when_the_provider_refuses_the_key(
    make_server: Callable[..., ParleyServer],
) -> None:
    guarded = FakeProvider(api_key="sk-right-" + "r" * 20).start()
    try:
        wrong = make_server(
            OPENAI_BASE_URL=guarded.base_url, OPENAI_API_KEY="sk-wrong-" + "w" * 20
        ).start()
        with wrong.client() as http:
            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["model"].startswith("rejected: the key was refused")
            assert "sk-wrong" not in ready.text
        right = make_server(
            OPENAI_BASE_URL=guarded.base_url, OPENAI_API_KEY="sk-right-" + "r" * 20
        ).start()
        with right.client() as http:
            ready = http.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json() == {"status": "ready", "database": "ok", "model": "ok"}
    finally:
        guarded.stop()


def test_readyz_is_not_ready_when_the_base_url_has_no_models(
    make_server: Callable[..., ParleyServer], provider: FakeProvider
) -> None:
    # The server's root, without the API's /v1: /models is not found there.
    server = make_server(OPENAI_BASE_URL=provider.base_url.removesuffix("/v1")).start()
    with server.client() as http:
        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["model"].startswith("not found: the base URL has no /models")
