"""Faults on purpose: a misbehaving provider, SIGTERM, probes, logs a machine can read."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.api_client import (
    as_user,
    messages,
    new_conversation,
    send,
    stored,
    stream,
    text_of,
    wait_for_status,
)
from tests.conftest import ParleyServer, free_port, unique
from tests.fake_provider import FakeProvider, Faults, answered, reply_for

# Patient enough for 30% of calls to fail, quick enough for a test; a hang is a timeout.
PATIENT = {
    "PARLEY_LLM_ATTEMPTS": "10",
    "PARLEY_LLM_RETRY_INTERVAL": "0.05",
    "PARLEY_LLM_TIMEOUT": "1",
}


@pytest.fixture
def faulty(provider: FakeProvider) -> Iterator[Callable[[Faults], None]]:
    def use(faults: Faults) -> None:
        provider.faults = faults

    yield use
    provider.faults = None


def test_turns_complete_through_30_percent_provider_faults(
    make_server: Callable[..., ParleyServer],
    provider: FakeProvider,
    faulty: Callable[[Faults], None],
) -> None:
    server = make_server(**PATIENT).start()
    faults = Faults(rate=0.3, hang_seconds=3)
    faulty(faults)
    user = unique()

    def chat(index: int) -> tuple[str, list[str]]:
        with as_user(server.client(timeout=120), user) as http:
            conversation = new_conversation(http)
            texts = [unique(f"[slow:0.01] c{index} t{turn} a b c d") for turn in range(3)]
            for text in texts:
                events = list(stream(http, send(http, conversation, text)))
                assert events[-1].event == "done", events[-1]
                assert text_of(events) == reply_for(text)
            return conversation, texts

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(chat, range(8)))

    assert set(faults.dealt) == {"500", "429", "timeout", "drop"}
    with as_user(server.client(), user) as http:
        for conversation, texts in results:
            assert stored(http, conversation) == answered(texts)
            # The model's memory of the conversation: every turn once, in order.
            (last,) = [c for c in provider.calls_for(texts[-1]) if c.fault is None]
            shown = [m["content"] for m in last.messages[1:]]
            assert shown == [texts[0], reply_for(texts[0]), texts[1], reply_for(texts[1]), texts[2]]


def test_retry_after_is_honoured(
    make_server: Callable[..., ParleyServer], provider: FakeProvider
) -> None:
    server = make_server(**PATIENT).start()
    text = unique("[fail-once:429] patience")
    with server.client() as http:
        response = http.post("/chat", json={"message": text, "username": unique()})
    assert response.status_code == 200
    first, second = provider.calls_for(text)
    # The provider said "Retry-After: 1"; the step's own interval is 0.05 s.
    assert second.at - first.at >= 0.95


def test_exhausted_retries_end_the_turn_readably_and_the_next_one_works(
    make_server: Callable[..., ParleyServer],
    provider: FakeProvider,
    faulty: Callable[[Faults], None],
) -> None:
    server = make_server(**{**PATIENT, "PARLEY_LLM_ATTEMPTS": "3"}).start()
    with as_user(server.client(), unique()) as http:
        conversation = new_conversation(http)
        faulty(Faults(rate=1.0, kinds=("500",)))
        doomed = unique("doomed")
        events = list(stream(http, send(http, conversation, doomed)))
        assert [e.event for e in events] == ["reset", "reset", "error"]
        assert events[-1].data["detail"] == "The model provider answered with an error (HTTP 500)."
        faulty(None)  # type: ignore[arg-type]
        fine = unique("fine")
        assert text_of(list(stream(http, send(http, conversation, fine)))) == reply_for(fine)
        stored = [(m["role"], m["status"]) for m in messages(http, conversation)]
        assert stored == [
            ("user", "complete"),
            ("assistant", "failed"),
            ("user", "complete"),
            ("assistant", "complete"),
        ]
    assert len(provider.calls_for(doomed)) == 3
    (call,) = provider.calls_for(fine)
    assert [m["content"] for m in call.messages[1:]] == [fine]


# --- Operations ----------------------------------------------------------------------


def test_health_and_readiness(make_server: Callable[..., ParleyServer]) -> None:
    server = make_server().start()
    with server.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "database": "ok", "model": "ok"}

    nowhere = make_server(OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1").start()
    with nowhere.client() as http:
        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["database"] == "ok"
        assert ready.json()["model"].startswith("unreachable")


def test_json_logs_carry_the_turn_id(make_server: Callable[..., ParleyServer]) -> None:
    server = make_server(PARLEY_LOG_FORMAT="json", PARLEY_LOG_LEVEL="info").start()
    with as_user(server.client(), unique()) as http:
        conversation = new_conversation(http)
        good = send(http, conversation, "fine")
        list(stream(http, good))
        bad = send(http, conversation, "[fail:400] refused")
        list(stream(http, bad))
    server.stop()
    records = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    about = {turn: [r for r in records if r.get("turn_id") == turn] for turn in (good, bad)}
    assert any("turn complete" in r["message"] for r in about[good])
    assert any(r["level"] == "warning" and "HTTP 400" in r["message"] for r in about[bad])


def test_sigterm_lets_a_turn_in_flight_finish(make_server: Callable[..., ParleyServer]) -> None:
    server = make_server(PARLEY_LOG_LEVEL="info").start()
    text = unique("[slow:0.1] " + " ".join(f"w{i}" for i in range(15)))
    with as_user(server.client(), unique()) as http:
        conversation = new_conversation(http)
        turn_id = send(http, conversation, text)
        user = http.headers["X-Parley-User"]
    assert server.process is not None
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then exits by the signal it was sent.
    assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=1)
    # The turn finished before the process exited.
    assert "turn complete" in server.log()

    server.start()
    with as_user(server.client(), user) as http:
        reply = wait_for_status(http, conversation, "complete")[-1]
        assert reply["content"] == reply_for(text)
        assert reply["turn_id"] == turn_id
