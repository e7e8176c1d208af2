"""Upgrading between versions: the previous release runs, is killed mid-turn, and this
version starts on its data.

The previous release is this repository's own commit, unpacked from git and run by the
same interpreter (``PYTHONPATH`` puts its source before the installed one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.api_client import stream
from tests.conftest import BACKENDS, ParleyServer, unique, unpack_release
from tests.fake_provider import FakeProvider
from tests.test_accounts import Person

# The last release whose turns ran under DBOS application version "0.1.0", with chat
# text in their workflow inputs, and whose accounts owned their data by name.
PREVIOUS_RELEASE = "93152bf"


@pytest.fixture(scope="module")
def previous_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack_release(PREVIOUS_RELEASE, tmp_path_factory.mktemp("previous-release"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_turn_interrupted_by_an_upgrade_ends_cleanly_and_data_carries_over(
    make_server: Callable[..., ParleyServer],
    database_url: str | None,
    provider: FakeProvider,
    previous_source: Path,
) -> None:
    old = make_server(database_url, PARLEY_AUTH="accounts", PYTHONPATH=str(previous_source))
    old.start()
    version = old.client().get("/openapi.json").json()["info"]["version"]
    assert version == "0.1.0"
    carol = Person(old, unique("carol"))
    assert carol.signup().status_code == 201
    said = carol.change("POST", "/chat", json={"message": "hello old", "username": carol.name})
    assert said.status_code == 200
    conversation = carol.change("POST", "/api/conversations").json()["id"]
    marker = f"interrupted {unique()}"
    provider.hold()
    # A first attempt that fails, so the reply's stream is in its second epoch (ids 2.x)
    # when the process dies.
    turn = carol.change(
        "POST",
        f"/api/conversations/{conversation}/messages",
        json={"content": f"[fail-once:500] [hang] {marker}"},
    ).json()["turn_id"]
    deadline = time.monotonic() + 10
    while len([call for call in provider.calls if marker in call.last_user]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    old.kill()
    provider.release()

    env = {k: v for k, v in old.env.items() if k != "PYTHONPATH"}
    new = ParleyServer(old.data_dir, env)
    new.port = old.port
    new.start()
    try:
        # On the same port, carol's client and its cookies carry on. The session, the
        # account and its history carry over.
        me = carol.http.get("/api/auth/me")
        assert me.status_code == 200, me.text
        history = carol.http.get(f"/history/{carol.name}").json()
        assert [m["content"] for m in history if m["isUser"]] == ["hello old"]
        # What the old release stored is in the search index the upgrade made.
        hits = carol.http.get("/api/search", params={"q": "HELLO ol"}).json()["results"]
        assert [(h["role"], h["snippet"]) for h in hits if h["role"] == "user"] == [
            ("user", "<mark>hello</mark> <mark>old</mark>")
        ]
        hits = carol.http.get("/api/search", params={"q": marker}).json()["results"]
        assert [h["conversation_id"] for h in hits] == [conversation]
        # The interrupted turn ended: failed, saying why, its stream ends, the
        # conversation takes a new message.
        messages = carol.http.get(f"/api/conversations/{conversation}/messages").json()
        reply = messages["messages"][-1]
        assert reply["status"] == "failed", reply
        assert "upgraded" in reply["error"]
        events = list(stream(carol.http, turn))
        assert events[-1].event == "error"
        # Also for a reader resuming in the second epoch: the end comes after it.
        resumed = list(stream(carol.http, turn, after="2.0"))
        assert [event.event for event in resumed] == ["error"], resumed
        again = carol.change(
            "POST", f"/api/conversations/{conversation}/messages", json={"content": "again"}
        )
        assert again.status_code == 202, again.text
        assert list(stream(carol.http, again.json()["turn_id"]))[-1].event == "done"
    finally:
        new.stop()
