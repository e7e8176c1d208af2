"""A schema-driven fuzz run (Schemathesis) over the OpenAPI spec: no input makes a 5xx.

Bounded: a few dozen generated requests per operation, against a real server (open mode
and accounts mode) with the fake provider behind it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from parley.app import create_app
from parley.config import Settings
from tests.conftest import AUTH_MODES, QUICK_RETRIES, ParleyServer, serve_in_mode, unique
from tests.fake_provider import FakeProvider


@pytest.fixture(scope="module", params=AUTH_MODES)
def fuzzed_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    provider: FakeProvider,
) -> Iterator[ParleyServer]:
    yield from serve_in_mode(request.param, tmp_path_factory, provider)


# The spec is the one the running servers publish at /openapi.json: the same app, built
# here without starting it.
schema = schemathesis.openapi.from_dict(create_app(Settings(_env_file=None)).openapi())


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_input_makes_a_server_error(
    case: schemathesis.Case, fuzzed_server: ParleyServer
) -> None:
    case.call_and_validate(base_url=fuzzed_server.url, checks=[not_a_server_error], timeout=30)


# --- Values no request may slip through ---------------------------------------------
# Every field of every operation of the spec (JSON body properties, query and path
# parameters), sent each kind of value that Python's JSON parser or URL decoding lets
# through but no database or JSON answer can hold, and look-alike or invisible text. A
# refusal is a 4xx in JSON naming the field; nothing is stored; the log has no traceback.

SPEC = create_app(Settings(_env_file=None)).openapi()

# name: (as a JSON literal in a body, as text in a URL: percent-encoded where it must be)
STRICT_VALUES = {
    "lone surrogate": ('"\\ud800"', "%ED%A0%80"),
    "NUL": ('"a\\u0000b"', "a%00b"),
    "NaN": ("NaN", "NaN"),
    "Infinity": ("Infinity", "Infinity"),
    "-Infinity": ("-Infinity", "-Infinity"),
    "1e999": ("1e999", "1e999"),
    "2**70": (str(2**70), str(2**70)),
}
LOOK_ALIKES = {
    "zero-width space": "\u200b",
    "right-to-left override": "\u202egnp.exe",
    "fullwidth": "\uff41\uff44\uff4d\uff49\uff4e",
    "mixed scripts": "p\u0430yp\u0430l",
    "no-break space": "\u00a0",
    "combining accent": "e\u0301",
}


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return _resolve(SPEC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]])
    for option in schema.get("anyOf", []):
        if option.get("type") != "null":
            return _resolve(option)
    return schema


def _typed(schema: dict[str, Any]) -> bool:
    """Whether a parameter's value must have a form (a number, a uuid, a time, a pattern):
    then no value of STRICT_VALUES is one."""
    schema = _resolve(schema)
    return schema.get("type") != "string" or "format" in schema or "pattern" in schema


def _targets() -> Iterator[Any]:
    for path, operations in SPEC["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] in ("query", "path"):
                    name = parameter["name"]
                    typed = _typed(parameter["schema"])
                    yield method.upper(), path, parameter["in"], name, typed
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                for name in _resolve(body["schema"]).get("properties", {}):
                    yield method.upper(), path, "body", name, True


TARGETS = list(_targets())
CASES = [
    pytest.param(
        target, kind, strict, id=f"{target[0]} {target[1]} {target[2]}.{target[3]}: {kind}"
    )
    for target in TARGETS
    for kind, strict in [(kind, True) for kind in STRICT_VALUES]
    + [(kind, False) for kind in LOOK_ALIKES]
]
MATRIX = [
    pytest.param((backend, mode), id=f"{backend}-{mode}", marks=marks)
    for backend, marks in (("sqlite", ()), ("postgres", pytest.mark.postgres))
    for mode in AUTH_MODES
]


class Caller:
    """Someone signed in (accounts mode) or named (open mode), with a conversation."""

    def __init__(self, server: ParleyServer, mode: str) -> None:
        self.server = server
        self.mode = mode
        self.name = unique("fuzz")
        self.http = server.client()
        self.anonymous = server.client()
        if mode == "accounts":
            signed_up = self.http.post(
                "/api/auth/signup", json={"username": self.name, "password": "fuzzing secret"}
            )
            assert signed_up.status_code == 201, signed_up.text
            self.http.headers["X-CSRF-Token"] = self.http.cookies["parley_csrf"]
        else:
            self.http.headers["X-Parley-User"] = self.name
        self.conversation = self.http.post("/api/conversations").json()["id"]

    def valid(self, path: str, name: str) -> str:
        """A well-formed value for a path parameter."""
        return {
            "conversation_id": self.conversation,
            "turn_id": f"turn-{uuid.uuid4()}",
            "token_id": "1",
            "message_id": "1",
            # /history/{username} is the caller's; /api/admin/users/{username} nobody's.
            "username": self.name if path.startswith("/history") else unique("nobody"),
        }[name]

    def body(self, path: str, method: str) -> dict[str, Any]:
        """A valid body for the operation (its required fields), to put one bad value
        into."""
        operation = SPEC["paths"][path][method.lower()]
        schema = _resolve(operation["requestBody"]["content"]["application/json"]["schema"])
        body: dict[str, Any] = {}
        required = set(schema.get("required", []))
        for name, field in schema.get("properties", {}).items():
            if name not in required:
                continue
            kind = _resolve(field).get("type")
            body[name] = (
                True
                if kind == "boolean"
                else self.name
                if name == "username"
                else "a long enough secret"
                if name == "password"
                else "ahoy"
            )
        return body

    def stored(self) -> tuple[Any, ...]:
        """What the caller has stored: ids only (replies of earlier turns may still be
        finishing, and change their status)."""
        conversations = self.http.get("/api/conversations", params={"limit": 200}).json()
        messages = self.http.get(f"/api/conversations/{self.conversation}/messages").json()
        history = self.http.get(f"/history/{self.name}").json()
        tokens = self.http.get("/api/auth/tokens").json() if self.mode == "accounts" else []
        return (
            sorted(c["id"] for c in conversations["conversations"]),
            [m["id"] for m in messages["messages"]],
            len(history),
            sorted(t["id"] for t in tokens),
        )


@pytest.fixture(scope="module", params=MATRIX)
def edge_caller(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    provider: FakeProvider,
) -> Iterator[Caller]:
    backend, mode = request.param
    env = {"OPENAI_BASE_URL": provider.base_url, "PARLEY_AUTH": mode, **QUICK_RETRIES}
    if backend == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_databases").new_url()
    running = ParleyServer(tmp_path_factory.mktemp(f"edges-{backend}-{mode}"), env).start()
    caller = Caller(running, mode)
    yield caller
    caller.http.close()
    caller.anonymous.close()
    running.stop()


def _names(response: httpx.Response, where: str, name: str) -> bool:
    detail = response.json().get("detail")
    return isinstance(detail, list) and any(
        entry["loc"][:2] == [where, name] for entry in detail if isinstance(entry, dict)
    )


@pytest.mark.parametrize("target, kind, strict", CASES)
def test_no_value_slips_through_a_field(
    edge_caller: Caller, target: tuple[str, str, str, str, bool], kind: str, strict: bool
) -> None:
    method, path, where, name, typed = target
    caller = edge_caller
    if strict:
        in_body, in_url = STRICT_VALUES[kind]
    else:
        in_body = json.dumps(LOOK_ALIKES[kind])
        in_url = quote(LOOK_ALIKES[kind], safe="")
    url = re.sub(
        r"\{(\w+)\}",
        lambda m: in_url if (where, m[1]) == ("path", name) else caller.valid(path, m[1]),
        path,
    )
    params = f"?{name}={in_url}" if where == "query" else ""
    content = None
    if "requestBody" in SPEC["paths"][path][method.lower()]:
        body = caller.body(path, method)
        # The bad value goes in as JSON text: no JSON library writes NaN or a lone
        # surrogate the way an attacker's client can.
        marker = "__value__"
        if where == "body":
            body[name] = marker
        content = json.dumps(body).replace(f'"{marker}"', in_body).encode()
    before = caller.stored() if strict and method != "GET" else None
    log_before = len(caller.server.log())

    # Signing up or in from the caller's client would replace the caller's session.
    http = caller.anonymous if path in ("/api/auth/signup", "/api/auth/login") else caller.http
    response = http.request(
        method,
        url + params,
        content=content,
        # Not kept for the next request: after a 500, uvicorn drops it.
        headers={"Connection": "close"}
        | ({"Content-Type": "application/json"} if content is not None else {}),
    )

    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json"), response.text
        if response.status_code == 422:
            assert _names(response, where, name), response.text
    # In open mode the routes of accounts answer 404 before they read anything.
    accounts_off = caller.mode == "open" and path.startswith(("/api/auth/tokens", "/api/admin"))
    if strict and (where == "body" or typed or kind == "NUL"):
        assert 400 <= response.status_code < 500, response.text
        if where == "body" and not accounts_off:
            assert response.status_code == 422 and _names(response, where, name), response.text
    if before is not None and response.status_code >= 400:
        assert caller.stored() == before
    assert "Traceback" not in caller.server.log()[log_before:]
