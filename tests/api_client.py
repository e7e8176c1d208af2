"""A client of Parley's streaming API, for tests: requests and a Server-Sent Events parser."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Sse:
    id: str
    event: str
    data: dict[str, Any]


def parse_sse(lines: Iterator[str]) -> Iterator[Sse]:
    """A Server-Sent Events parser (the parts of the format Parley uses)."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield Sse(
                    fields.get("id", ""),
                    fields.get("event", "message"),
                    json.loads("\n".join(data)),
                )
            fields, data = {}, []
        elif line.startswith(":"):
            continue  # a keep-alive comment
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value


def stream(
    http: httpx.Client, turn_id: str, *, after: str | None = None, query: bool = False
) -> Iterator[Sse]:
    headers, params = {}, {}
    if after is not None:
        if query:
            params["after"] = after
        else:
            headers["Last-Event-ID"] = after
    with http.stream("GET", f"/api/turns/{turn_id}/stream", headers=headers, params=params) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        yield from parse_sse(r.iter_lines())


def text_of(events: list[Sse]) -> str:
    """The reply as a client shows it: tokens appended, a reset clearing them."""
    text = ""
    for event in events:
        if event.event == "reset":
            text = ""
        elif event.event == "token":
            text += event.data["text"]
    return text


def as_user(http: httpx.Client, user: str) -> httpx.Client:
    http.headers["X-Parley-User"] = user
    return http


def new_conversation(http: httpx.Client) -> str:
    response = http.post("/api/conversations")
    assert response.status_code == 201, response.text
    return response.json()["id"]


def send(http: httpx.Client, conversation: str, content: str, **headers: str) -> str:
    response = http.post(
        f"/api/conversations/{conversation}/messages", json={"content": content}, headers=headers
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["stream_url"] == f"/api/turns/{body['turn_id']}/stream"
    return body["turn_id"]


def messages(http: httpx.Client, conversation: str) -> list[dict[str, Any]]:
    response = http.get(f"/api/conversations/{conversation}/messages")
    assert response.status_code == 200, response.text
    return response.json()["messages"]


def as_streamed(message: dict[str, Any]) -> dict[str, Any]:
    """A listed message as a stream's final event carries it: without its versions."""
    return {key: value for key, value in message.items() if key != "siblings"}


def stored(http: httpx.Client, conversation: str) -> list[tuple[str, str, str]]:
    """The conversation's messages as ``(role, content, status)``."""
    return [(m["role"], m["content"], m["status"]) for m in messages(http, conversation)]


def stream_stopping(
    http: httpx.Client, turn_id: str, *, stopper: httpx.Client | None = None, after: int = 3
) -> list[Sse]:
    """A turn's events, its stop asked for (through ``stopper``, by default the reader's
    own client) once ``after`` events have come."""
    seen: list[Sse] = []
    for event in stream(http, turn_id):
        seen.append(event)
        if len(seen) == after:
            asked = (stopper or http).post(f"/api/turns/{turn_id}/cancel")
            assert asked.status_code == 200, asked.text
            assert asked.json() == {"turn_id": turn_id, "status": "stopping"}
    return seen


def routes_of(conversation: str, turn_id: str) -> list[tuple[str, str, Any]]:
    """Every request that reads or changes a conversation or one of its turns, as
    ``(method, path, JSON body)``: what nobody but the owner may do."""
    return [
        ("GET", f"/api/conversations/{conversation}", None),
        ("PATCH", f"/api/conversations/{conversation}", {"title": "mine now"}),
        ("DELETE", f"/api/conversations/{conversation}", None),
        ("GET", f"/api/conversations/{conversation}/messages", None),
        ("POST", f"/api/conversations/{conversation}/messages", {"content": "hi"}),
        ("GET", f"/api/turns/{turn_id}/stream", None),
        ("POST", f"/api/turns/{turn_id}/cancel", None),
    ]


def wait_for_status(http: httpx.Client, conversation: str, status: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        found = messages(http, conversation)
        if found and found[-1]["status"] == status:
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


def send_and_finish(http: httpx.Client, conversation: str, content: str) -> list[Sse]:
    events = list(stream(http, send(http, conversation, content)))
    assert events[-1].event == "done", events[-1]
    return events
