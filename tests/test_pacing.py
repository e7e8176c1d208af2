"""The provider's limits: turns wait in a durable, fair queue instead of failing.

The fake provider here keeps limits as a real one does (requests in flight and per
minute, 429 with ``Retry-After`` above them), and counts what it admitted and refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx2
import openai
import pytest

from parley import llm, pacing
from tests.api_client import as_user, new_conversation, send, stream, text_of
from tests.conftest import BACKENDS, ParleyServer, unique
from tests.fake_provider import FakeProvider, Limits, reply_for
from tests.test_durability import wait_for

TERMINAL = ("done", "error", "stopped")


@pytest.fixture
def limited() -> Iterator[FakeProvider]:
    """A provider of its own, with a one-second model, for each test to limit."""
    fake = FakeProvider(latency=1.0).start()
    yield fake
    fake.release()
    fake.stop()


@dataclass
class Outcome:
    user: str
    text: str
    sent: float = 0.0
    accepted: float = 0.0  # when the 202 came
    events: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    reply: str = ""
    first_token: float = 0.0
    ended: float = 0.0


async def _read_stream(http: httpx.AsyncClient, turn_id: str, outcome: Outcome) -> None:
    event, data = "message", ""
    async with http.stream("GET", f"/api/turns/{turn_id}/stream") as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                data = line.partition(":")[2].strip()
            elif line == "" and data:
                body = json.loads(data)
                outcome.events.append(event)
                if event == "queued":
                    outcome.positions.append(body["position"])
                elif event == "token":
                    outcome.first_token = outcome.first_token or time.monotonic()
                    outcome.reply += body["text"]
                elif event == "reset":
                    outcome.reply = ""
                if event in TERMINAL:
                    outcome.ended = time.monotonic()
                    return
                event, data = "message", ""


async def _burst_async(url: str, users: int, per_user: int) -> tuple[list[Outcome], float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        outcomes: list[Outcome] = []
        conversations: list[str] = []
        for u in range(users):
            user = f"burst-{u}"
            for i in range(per_user):
                response = await http.post("/api/conversations", headers={"X-Parley-User": user})
                assert response.status_code == 201, response.text
                conversations.append(response.json()["id"])
                outcomes.append(Outcome(user, f"message {i} of {user}"))

        async def one(conversation: str, outcome: Outcome) -> None:
            headers = {"X-Parley-User": outcome.user}
            outcome.sent = time.monotonic()
            response = await http.post(
                f"/api/conversations/{conversation}/messages",
                json={"content": outcome.text},
                headers=headers,
            )
            assert response.status_code == 202, response.text
            outcome.accepted = time.monotonic()
            http_user = httpx.AsyncClient(base_url=url, timeout=600, headers=headers, limits=limits)
            async with http_user:
                await _read_stream(http_user, response.json()["turn_id"], outcome)

        started = time.monotonic()
        await asyncio.gather(*(one(c, o) for c, o in zip(conversations, outcomes, strict=True)))
        return outcomes, time.monotonic() - started


def burst(server: ParleyServer, users: int = 30, per_user: int = 10) -> tuple[list[Outcome], float]:
    """Every user sends ``per_user`` messages at once, each in a conversation of its own,
    and reads its reply's stream; what each saw, and how long the whole burst took."""
    return asyncio.run(_burst_async(server.url, users, per_user))


def fastest_possible(turns: int, limits: Limits, latency: float) -> float:
    """The soonest ``turns`` one-request turns can all be answered within ``limits``:
    each starts as soon as both limits allow."""
    starts: list[float] = []
    ends: list[float] = []
    for k in range(turns):
        at = 0.0
        if limits.concurrency is not None and k >= limits.concurrency:
            at = max(at, sorted(ends)[k - limits.concurrency])
        if limits.per_minute is not None and k >= limits.per_minute:
            at = max(at, starts[k - limits.per_minute] + limits.window)
        starts.append(at)
        ends.append(at + latency)
    return max(ends)


def _limited_server(
    make_server: Callable[..., ParleyServer],
    database_url: str | None,
    provider: FakeProvider,
    **env: str,
) -> ParleyServer:
    return make_server(
        database_url,
        OPENAI_BASE_URL=provider.base_url,
        # The default budget: a turn may keep asking through refusals for 5 minutes.
        PARLEY_LLM_ATTEMPTS="5",
        PARLEY_LLM_RETRY_INTERVAL="0.5",
        **env,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_burst_within_the_limits_parley_is_told_is_never_refused(
    make_server: Callable[..., ParleyServer], database_url: str | None, limited: FakeProvider
) -> None:
    """300 turns from 30 users against a provider allowing 4 in flight and 120 a minute,
    with Parley told the same: none fails, the provider refuses none and never holds more
    than its limits, and the burst takes close to the least time the limits allow."""
    limited.limits = Limits(concurrency=4, per_minute=120)
    server = _limited_server(
        make_server,
        database_url,
        limited,
        PARLEY_LLM_CONCURRENCY="4",
        PARLEY_LLM_REQUESTS_PER_MINUTE="120",
    ).start()
    outcomes, took = burst(server)

    assert [o for o in outcomes if o.events[-1] != "done"] == []
    assert all(o.reply == reply_for(o.text) for o in outcomes)
    assert limited.limits.refused == 0
    assert limited.limits.most_in_flight == 4
    assert limited.limits.most_in_any_window() <= 120
    assert len(limited.calls) == 300
    least = fastest_possible(300, Limits(concurrency=4, per_minute=120), 1.0)
    assert least <= took <= least * 1.1, (took, least)
    # The turns that waited were told where they stood, before their first piece. (A
    # place may also grow: another user's message joins an earlier round.)
    # Counted from the 202, as a reader can only ask then; and with room for the burst's
    # own delay in serving that request (its 300 sends take seconds to store on SQLite),
    # during which a turn may leave the queue before its reader is told anything.
    waited = [o for o in outcomes if o.first_token - o.accepted > 15]
    assert len(waited) > 200
    untold = [
        (o.text, round(o.accepted - o.sent, 2), round(o.first_token - o.sent, 2))
        for o in waited
        if not (o.positions and o.events.index("queued") < o.events.index("token"))
    ]
    assert untold == [], (untold[:5], len(untold))
    assert min(min(o.positions) for o in waited) == 1
    assert max(max(o.positions) for o in waited) > 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_burst_at_limits_parley_is_not_told_fails_no_turn(
    make_server: Callable[..., ParleyServer], database_url: str | None, limited: FakeProvider
) -> None:
    """The same burst with Parley not told the limits: every turn is answered, and the
    provider's refusals stay bounded.

    The bound: a refusal closes Parley's gate for the Retry-After, and the refusals of
    that pause are of requests already out when it began: at most W_k, the gate's width
    then. The pause halves the width, and until the next pause it grows by at most one
    per answered request (S_k of them): W_k+1 <= W_k / 2 + S_k. Summed over the pauses,
    the refusals are at most 2 x (W_0 + S): W_0, the requests out at the first refusal,
    is at most the 300 turns, and S, the answers, is 300. So at most 1,200, where
    retrying each turn on its own schedule would fail turns instead.
    """
    limited.limits = Limits(concurrency=4, per_minute=120)
    server = _limited_server(make_server, database_url, limited).start()
    outcomes, took = burst(server)

    assert [o for o in outcomes if o.events[-1] != "done"] == []
    assert all(o.reply == reply_for(o.text) for o in outcomes)
    refused = limited.limits.refused
    assert len(limited.calls) == 300 + refused
    assert refused <= 2 * (300 + 300), refused
    assert limited.limits.most_in_any_window() <= 120  # the provider kept its limits
    print(f"refused {refused}, took {took:.1f} s")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_users_burst_does_not_delay_another_users_message(
    make_server: Callable[..., ParleyServer], database_url: str | None, limited: FakeProvider
) -> None:
    """One user queues 40 messages (in 40 conversations), then another sends one: its
    reply starts within two model latencies."""
    limited.limits = Limits(concurrency=4)
    server = _limited_server(make_server, database_url, limited, PARLEY_LLM_CONCURRENCY="4").start()
    heavy, light = unique("heavy"), unique("light")
    with as_user(server.client(), heavy) as http:
        for i in range(40):
            conversation = new_conversation(http)
            response = http.post(
                f"/api/conversations/{conversation}/messages", json={"content": f"burst {i}"}
            )
            assert response.status_code == 202
    wait_for(lambda: len(limited.calls) >= 4)
    with as_user(server.client(), light) as http:
        conversation = new_conversation(http)
        sent = time.time()
        response = http.post(
            f"/api/conversations/{conversation}/messages", json={"content": "just one"}
        )
        assert response.status_code == 202
        events = list(stream(http, response.json()["turn_id"]))
    asked = limited.calls_for("just one")
    assert len(asked) == 1
    assert asked[0].at - sent <= 2 * limited.latency, asked[0].at - sent
    assert text_of(events) == reply_for("just one")
    # Most of the heavy user's turns were still waiting: the light one went ahead of them.
    before = [call for call in limited.calls if call.at < asked[0].at]
    assert len(before) <= 12, len(before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_turns_queued_at_a_crash_all_finish_once_after_restart(
    make_server: Callable[..., ParleyServer], database_url: str | None, limited: FakeProvider
) -> None:
    """SIGKILL with turns waiting in the queue: after the restart every turn is answered
    once; those that had not started are asked of the model once, ever."""
    limited.limits = Limits(concurrency=2)
    server = _limited_server(make_server, database_url, limited, PARLEY_LLM_CONCURRENCY="2").start()
    user = unique("crash")
    texts = [f"queued {i}" for i in range(12)]
    conversations = []
    with as_user(server.client(), user) as http:
        for text in texts:
            conversation = new_conversation(http)
            response = http.post(
                f"/api/conversations/{conversation}/messages", json={"content": text}
            )
            assert response.status_code == 202
            conversations.append(conversation)
    wait_for(lambda: len(limited.calls) >= 2)
    asked_before = {call.last_user for call in limited.calls}
    server.kill()
    assert len(asked_before) <= 4  # the rest were waiting in the queue
    server.start()

    with as_user(server.client(), user) as http:

        def all_answered() -> bool:
            return all(
                http.get(f"/api/conversations/{c}/messages").json()["messages"][-1]["status"]
                == "complete"
                for c in conversations
            )

        wait_for(all_answered, timeout=60)
        for conversation, text in zip(conversations, texts, strict=True):
            shown = http.get(f"/api/conversations/{conversation}/messages").json()["messages"]
            assert [(m["role"], m["content"]) for m in shown] == [
                ("user", text),
                ("assistant", reply_for(text)),
            ]
    for text in texts:
        expected = 1 if text not in asked_before else (1, 2)
        count = len(limited.calls_for(text))
        assert count == expected if isinstance(expected, int) else count in expected, text
    assert limited.limits.refused == 0
    assert server.count_in_dbos("workflow_status", "status IN ('PENDING', 'ENQUEUED')") == 0


@pytest.mark.postgres
def test_two_replicas_share_one_limit(
    make_server: Callable[..., ParleyServer], postgres_databases: Any, limited: FakeProvider
) -> None:
    """Two replicas on one database, each told the provider allows 3 in flight: together
    they never have more than 3 out, and use all 3."""
    limited.limits = Limits(concurrency=3)
    url = postgres_databases.new_url()
    servers = [
        _limited_server(
            make_server,
            url,
            limited,
            PARLEY_EXECUTOR_ID=name,
            PARLEY_LLM_CONCURRENCY="3",
            PARLEY_DB_CONNECTIONS="15",
        ).start()
        for name in ("replica-a", "replica-b")
    ]

    async def send_all() -> None:
        async with httpx.AsyncClient(timeout=120) as http:

            async def one(i: int) -> None:
                server = servers[i % 2]
                headers = {"X-Parley-User": f"user-{i % 5}"}
                created = await http.post(f"{server.url}/api/conversations", headers=headers)
                conversation = created.json()["id"]
                response = await http.post(
                    f"{server.url}/api/conversations/{conversation}/messages",
                    json={"content": f"shared {i}"},
                    headers=headers,
                )
                assert response.status_code == 202
                outcome = Outcome(headers["X-Parley-User"], f"shared {i}")
                async with httpx.AsyncClient(
                    base_url=server.url, timeout=120, headers=headers
                ) as c:
                    await _read_stream(c, response.json()["turn_id"], outcome)
                assert outcome.events[-1] == "done" and outcome.reply == reply_for(outcome.text)

            await asyncio.gather(*(one(i) for i in range(30)))

    asyncio.run(send_all())
    assert limited.limits.refused == 0
    assert limited.limits.most_in_flight == 3
    assert len(limited.calls) == 30
    # Both replicas ran turns (each dequeues whichever it reaches first).
    for name in ("replica-a", "replica-b"):
        ran = servers[0].count_in_dbos(
            "workflow_status", "executor_id LIKE ? AND name LIKE ?", f"{name}/%", "%chat_turn"
        )
        assert ran > 0, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_queued_turn_can_be_stopped_and_its_conversation_deleted_at_once(
    make_server: Callable[..., ParleyServer], database_url: str | None, limited: FakeProvider
) -> None:
    limited.hold()
    limited.latency = 0.0
    server = _limited_server(make_server, database_url, limited, PARLEY_LLM_CONCURRENCY="1").start()
    with as_user(server.client(), unique("stopper")) as http:
        busy = new_conversation(http)
        http.post(f"/api/conversations/{busy}/messages", json={"content": "[hang] first"})
        wait_for(lambda: len(limited.calls) == 1)

        waiting = new_conversation(http)
        turn = http.post(f"/api/conversations/{waiting}/messages", json={"content": "second"})
        turn_id = turn.json()["turn_id"]
        events = stream(http, turn_id)
        first = next(events)
        assert (first.event, first.data, first.id) == ("queued", {"position": 1}, "")
        stopped = http.post(f"/api/turns/{turn_id}/cancel")
        assert stopped.json() == {"turn_id": turn_id, "status": "stopped"}
        rest = list(events)
        assert rest[-1].event == "stopped"
        assert rest[-1].data["message"]["status"] == "stopped"
        shown = http.get(f"/api/conversations/{waiting}/messages").json()["messages"]
        assert [m["status"] for m in shown] == ["complete", "stopped"]

        third = new_conversation(http)
        queued = http.post(f"/api/conversations/{third}/messages", json={"content": "third"})
        queued_id = queued.json()["turn_id"]
        assert http.delete(f"/api/conversations/{third}").status_code == 204
        assert server.count_in_dbos("workflow_status", "workflow_uuid = ?", queued_id) == 0

        limited.release()
        wait_for(
            lambda: (
                http.get(f"/api/conversations/{busy}/messages").json()["messages"][-1]["status"]
                == "complete"
            )
        )
    time.sleep(0.5)  # the queue would have started them by now
    assert [call.last_user for call in limited.calls] == ["[hang] first"]


def test_without_limits_turns_start_at_once_and_nothing_is_queued(
    make_server: Callable[..., ParleyServer], limited: FakeProvider
) -> None:
    """The defaults change nothing: no queue, no waiting, no ``queued`` event."""
    limited.latency = 0.0
    server = _limited_server(make_server, None, limited).start()
    with as_user(server.client(), unique("free")) as http:
        conversation = new_conversation(http)
        response = http.post(f"/api/conversations/{conversation}/messages", json={"content": "hi"})
        events = list(stream(http, response.json()["turn_id"]))
    assert [e.event for e in events if e.event != "token"] == ["done"]
    assert server.count_in_dbos("workflow_status", "queue_name = 'parley-model'") == 0


async def test_the_gate_closes_for_the_pause_and_narrows_to_half_of_those_out() -> None:
    gate = pacing.Gate()
    entered: list[float] = []
    release = asyncio.Event()

    async def request() -> None:
        async with gate.request():
            entered.append(time.monotonic())
            await release.wait()

    first = [asyncio.create_task(request()) for _ in range(8)]
    await asyncio.sleep(0.05)
    assert len(entered) == 8  # wide open until the first refusal
    refused_at = time.monotonic()
    await gate.refused(0.3)
    assert gate.width == 4.0
    await gate.refused(0.3)  # out when the first came: it says nothing new
    assert gate.width == 4.0
    release.set()
    await asyncio.gather(*first)
    release.clear()
    later = [asyncio.create_task(request()) for _ in range(6)]
    await asyncio.sleep(0.6)
    assert len(entered) == 8 + 4  # four at once, after the pause
    assert min(entered[8:]) - refused_at >= 0.3
    release.set()
    await asyncio.gather(*later)
    for _ in range(4):
        await gate.answered()
    assert 4.9 < gate.width < 5.0  # past half the width refused: one per window answered


async def test_the_gate_keeps_a_per_minute_limit_by_when_requests_leave(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pacing, "SENT_MINUTE_SECONDS", 0.5)
    gate = pacing.Gate()
    gate.limit(None, per_minute=3)
    left: list[float] = []
    for _ in range(5):
        async with gate.request():
            left.append(time.monotonic())
    assert left[2] - left[0] < 0.1
    assert left[3] - left[0] >= 0.5
    assert left[4] - left[1] >= 0.5


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("2", 2.0),
        ("0.5", 0.5),
        ("-3", 0.0),
        ("100000", llm.MAX_RETRY_AFTER),
        ("nan", None),
        ("inf", None),
        ("soon", None),
        ("", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_retry_after_is_read_in_seconds_or_as_a_date(header: str, seconds: float | None) -> None:
    request = httpx2.Request("POST", "http://provider/v1/chat/completions")
    response = httpx2.Response(429, headers={"Retry-After": header}, request=request)
    error = openai.RateLimitError("refused", response=response, body=None)
    assert llm.retry_after(error) == seconds


@pytest.mark.postgres
def test_a_429_on_one_replica_pauses_the_others_too(
    make_server: Callable[..., ParleyServer], postgres_databases: Any, limited: FakeProvider
) -> None:
    """Not told the limits: replica A is refused and told to wait; replica B, asked a
    moment later, waits as well instead of being refused in its turn."""
    limited.latency = 0.0
    limited.limits = Limits(per_minute=2, window=4.0)
    url = postgres_databases.new_url()
    a, b = (
        _limited_server(make_server, url, limited, PARLEY_EXECUTOR_ID=name).start()
        for name in ("pause-a", "pause-b")
    )
    with as_user(a.client(), unique("a")) as http:
        for i in range(3):
            send(http, new_conversation(http), f"on a {i}")
    wait_for(lambda: limited.limits.refused == 1)
    refused_at = time.time()
    time.sleep(0.5)  # the notification reaches B
    with as_user(b.client(), unique("b")) as http:
        conversation = new_conversation(http)
        events = list(stream(http, send(http, conversation, "on b")))
    assert text_of(events) == reply_for("on b")
    (asked,) = limited.calls_for("on b")
    assert asked.at - refused_at >= 2.0  # it waited for the pause A was given
    assert limited.limits.refused == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_chat_waiting_in_the_queue_answers_when_its_conversation_is_deleted(
    make_server: Callable[..., ParleyServer], database_url: str | None, limited: FakeProvider
) -> None:
    """``POST /chat`` waits for a queued turn; deleting the conversation meanwhile ends
    the wait at once (409, as for a reply deleted while written), not never."""
    limited.hold()
    limited.latency = 0.0
    server = _limited_server(make_server, database_url, limited, PARLEY_LLM_CONCURRENCY="1").start()
    with as_user(server.client(), unique("hog")) as http:
        http.post(
            f"/api/conversations/{new_conversation(http)}/messages", json={"content": "[hang] x"}
        )
    wait_for(lambda: len(limited.calls) == 1)
    name = unique("waiter")

    def chat() -> httpx.Response:
        with server.client(timeout=60) as http:
            return http.post("/chat", json={"message": "queued for ever?", "username": name})

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(chat)
        wait_for(lambda: server.count_in_dbos("workflow_status", "status = 'ENQUEUED'") == 1)
        with as_user(server.client(), name) as http:
            (conversation,) = http.get("/api/conversations").json()["conversations"]
            deleted_at = time.monotonic()
            assert http.delete(f"/api/conversations/{conversation['id']}").status_code == 204
        response = answer.result(timeout=30)
        assert time.monotonic() - deleted_at < 2
    assert response.status_code == 409, response.text
    assert server.count_in_dbos("workflow_status", "status IN ('ENQUEUED', 'PENDING')") == 1
    limited.release()
