"""Parley as a cluster on PostgreSQL: replicas and workers that cover for each other.

Every replica here is a ``parley serve`` process of its own on one PostgreSQL database,
named as a replica on another machine would be (``PARLEY_EXECUTOR_ID``). The limit after
which a silent process counts as dead is set to a few seconds, so that the tests wait for
it in seconds rather than a minute.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest

from tests.api_client import (
    Sse,
    as_user,
    messages,
    new_conversation,
    send_and_finish,
    stored,
    stream,
)
from tests.conftest import ParleyServer, unique, unpack_release
from tests.fake_provider import FakeProvider, answered, reply_for
from tests.test_durability import wait_for

# Dead after 9 s: heartbeats every 1.5 s, taken for dead after 6 s without one.
CLUSTER_ENV = {"PARLEY_DEAD_AFTER_SECONDS": "9", "PARLEY_DB_CONNECTIONS": "15"}
TERMINAL = ("done", "error", "stopped")


@pytest.fixture
def cluster_url(postgres_databases: Any) -> str:
    return postgres_databases.new_url()


def replicas(
    make_server: Callable[..., ParleyServer], url: str, names: list[str], **env: str
) -> list[ParleyServer]:
    servers = [make_server(url, PARLEY_EXECUTOR_ID=name, **CLUSTER_ENV, **env) for name in names]
    for server in servers:
        server.start()
    return servers


def executors(url: str) -> dict[str, dict[str, Any]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT executor_id, pid, extract(epoch from clock_timestamp()) - heartbeat_at "
            "FROM executors"
        ).fetchall()
    return {row[0]: {"pid": row[1], "age": row[2]} for row in rows}


def pending_turns(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM dbos.workflow_status "
            "WHERE status IN ('PENDING', 'ENQUEUED') AND workflow_uuid LIKE 'turn-%%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


class Balancer:
    """What a load balancer without sticky sessions does: send each request to some
    replica, and try the next one when a replica does not answer."""

    def __init__(self, servers: list[ParleyServer], first: int, user: str) -> None:
        self.servers = servers
        self.index = first
        self.user = user

    def client(self, offset: int = 0) -> httpx.Client:
        server = self.servers[(self.index + offset) % len(self.servers)]
        return as_user(server.client(timeout=30), self.user)

    def call(self, deadline: float, action: Callable[[httpx.Client], Any]) -> Any:
        while True:
            try:
                with self.client() as http:
                    return action(http)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                self.index += 1  # that replica is gone: the next one
                time.sleep(0.1)

    def follow(self, turn_id: str, deadline: float, offset: int = 0) -> list[Sse]:
        """A turn's stream read to its end, through another replica than the writer's
        (``offset``), resuming on the next replica if that one dies."""
        events: list[Sse] = []
        while not events or events[-1].event not in TERMINAL:
            try:
                with self.client(offset) as http:
                    after = events[-1].id if events else None
                    events.extend(stream(http, turn_id, after=after))
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                self.index += 1
                time.sleep(0.1)
        return events


def test_three_replicas_finish_every_turn_of_one_that_dies_for_good(
    make_server: Callable[..., ParleyServer], cluster_url: str, provider: FakeProvider
) -> None:
    """60 turns over three replicas, half streamed and read through another replica than
    the one writing them; one replica is SIGKILLed mid-load and never comes back."""
    servers = replicas(make_server, cluster_url, ["east", "west", "north"])
    clients, turns_each = 20, 3
    deadline = time.monotonic() + 90
    started = threading.Event()

    def client(index: int) -> tuple[str, str, list[str], list[str]]:
        balancer = Balancer(servers, index % 3, unique(f"c{index}"))
        streamed = index % 2 == 0
        conversation = balancer.call(deadline, new_conversation)
        texts, endings = [], []
        for turn in range(turns_each):
            if streamed:
                text = unique(f"[slow:0.1] c{index} t{turn} " + " ".join("w" * 15))
            else:
                text = unique(f"[delay:1] c{index} t{turn}")
            key = {"Idempotency-Key": f"turn-{turn}"}

            def start(http: httpx.Client, text: str = text, key: dict[str, str] = key) -> str:
                response = http.post(
                    f"/api/conversations/{conversation}/messages",
                    json={"content": text},
                    headers=key,
                )
                assert response.status_code in (200, 202), response.text
                return str(response.json()["turn_id"])

            turn_id = balancer.call(deadline, start)
            started.set()
            if streamed:
                events = balancer.follow(turn_id, deadline, offset=1)
                assert events[-1].event == "done", events[-1]
                assert "".join(e.data["text"] for e in events if e.event == "token").endswith(
                    reply_for(text)
                ) or events[-1].data["message"]["content"] == reply_for(text)
                endings.append(events[-1].event)
            else:

                def finished(http: httpx.Client, text: str = text) -> bool:
                    found = messages(http, conversation)
                    return bool(found) and found[-1]["status"] == "complete"

                while not balancer.call(deadline, finished):
                    assert time.monotonic() < deadline, "a turn did not finish in time"
                    time.sleep(0.1)
                endings.append("done")
            texts.append(text)
        return balancer.user, conversation, texts, endings

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [pool.submit(client, index) for index in range(clients)]
        started.wait(30)
        time.sleep(1.5)  # turns in flight on every replica
        doomed = servers[0]
        doomed_id = "east/0"
        in_flight = sum(
            1
            for row in psycopg.connect(cluster_url)
            .execute(
                "SELECT 1 FROM dbos.workflow_status WHERE executor_id = %s AND status = 'PENDING'",
                (doomed_id,),
            )
            .fetchall()
        )
        doomed.kill()
        finished = [future.result() for future in results]

    assert in_flight > 0, "the killed replica had no turn in flight"
    assert time.monotonic() < deadline
    for user, conversation, texts, endings in finished:
        assert endings == ["done"] * turns_each
        http = as_user(servers[1].client(), user)
        assert stored(http, conversation) == answered(texts)
        follow_up = unique("and?")
        send_and_finish(http, conversation, follow_up)
        assert provider.remembered(follow_up) == [
            part for text in texts for part in (text, reply_for(text))
        ]
        for text in texts:
            assert 1 <= len(provider.calls_for(text)) <= 2, text
    # Each workflow records its end a moment after its reply is stored.
    wait_for(lambda: pending_turns(cluster_url) == 0)
    # The dead replica's row is gone: a survivor took it over.
    assert doomed_id not in executors(cluster_url)


def test_a_paused_replica_is_taken_over_and_writes_nothing_when_it_wakes(
    make_server: Callable[..., ParleyServer], cluster_url: str, provider: FakeProvider
) -> None:
    """SIGSTOP past the limit: another replica finishes the turn; the conversation goes
    on there; then SIGCONT: the woken replica must not write its stale copy of the turn
    (a checkpoint from before the next turn would make the model forget it)."""
    sleeper, survivor = replicas(make_server, cluster_url, ["sleeper", "survivor"])
    user = unique("pause")
    on_sleeper = as_user(sleeper.client(), user)
    on_survivor = as_user(survivor.client(timeout=60), user)
    conversation = new_conversation(on_sleeper)
    first = unique("[hang] first")
    provider.hold()
    sent = on_sleeper.post(f"/api/conversations/{conversation}/messages", json={"content": first})
    assert sent.status_code == 202
    turn_id = sent.json()["turn_id"]
    wait_for(lambda: len(provider.calls_for(first)) == 1)
    os.kill(sleeper.pid, signal.SIGSTOP)
    try:
        # The survivor takes the turn over and asks the model again.
        wait_for(lambda: len(provider.calls_for(first)) == 2, timeout=30)
        provider.release()  # both calls are answered; the sleeper's waits in its socket
        events = list(stream(on_survivor, turn_id))
        assert events[-1].event == "done"
        assert events[-1].data["message"]["content"] == reply_for(first)
        second = unique("second")
        send_and_finish(on_survivor, conversation, second)
    finally:
        os.kill(sleeper.pid, signal.SIGCONT)
    # Woken, it finds its turns taken over and exits without writing.
    assert sleeper.process is not None
    assert sleeper.process.wait(timeout=30) == 75
    assert "taken for dead" in sleeper.log()

    third = unique("third")
    send_and_finish(on_survivor, conversation, third)
    assert provider.remembered(third) == [first, reply_for(first), second, reply_for(second)]
    stored = [(m["role"], m["content"]) for m in messages(on_survivor, conversation)]
    assert stored == [
        ("user", first),
        ("assistant", reply_for(first)),
        ("user", second),
        ("assistant", reply_for(second)),
        ("user", third),
        ("assistant", reply_for(third)),
    ]
    assert pending_turns(cluster_url) == 0


def test_turns_recovered_twice_at_once_still_run_once(
    make_server: Callable[..., ParleyServer], cluster_url: str, provider: FakeProvider
) -> None:
    """A dead replica whose row is gone (its taker died before recovering its turns) has
    its turns recovered by every survivor at once: DBOS runs each of them once."""
    doomed, *survivors = replicas(make_server, cluster_url, ["gone", "left", "right"])
    provider.hold()
    user = unique("twice")
    http = as_user(doomed.client(), user)
    texts, turn_ids, conversations = [], [], []
    for index in range(4):
        conversation = new_conversation(http)
        text = unique(f"[hang] twice {index}")
        response = http.post(f"/api/conversations/{conversation}/messages", json={"content": text})
        assert response.status_code == 202
        texts.append(text)
        turn_ids.append(response.json()["turn_id"])
        conversations.append(conversation)
    wait_for(lambda: all(len(provider.calls_for(text)) == 1 for text in texts))
    doomed.kill()
    with psycopg.connect(cluster_url, autocommit=True) as conn:
        conn.execute("DELETE FROM executors WHERE executor_id = 'gone/0'")
    provider.release()
    reader = as_user(survivors[0].client(timeout=60), user)
    for turn_id, text in zip(turn_ids, texts, strict=True):
        events = list(stream(reader, turn_id))
        assert events[-1].event == "done"
        assert events[-1].data["message"]["content"] == reply_for(text)
    wait_for(lambda: pending_turns(cluster_url) == 0)
    for conversation, text in zip(conversations, texts, strict=True):
        assert len(provider.calls_for(text)) == 2  # before the kill, and once after it
        stored = [(m["role"], m["content"]) for m in messages(reader, conversation)]
        assert stored == [("user", text), ("assistant", reply_for(text))]
        with psycopg.connect(cluster_url) as conn:
            steps = conn.execute(
                "SELECT count(*) FROM dbos.operation_outputs o JOIN messages m "
                "ON m.turn_id = o.workflow_uuid WHERE m.conversation_id = %s "
                "AND m.role = 'user'",
                (conversation,),
            ).fetchone()
        assert steps == (1,)  # one recorded step: the answer


def test_an_executor_id_in_use_elsewhere_is_refused(
    make_server: Callable[..., ParleyServer], cluster_url: str
) -> None:
    first = make_server(cluster_url, PARLEY_EXECUTOR_ID="shared", **CLUSTER_ENV).start()
    with psycopg.connect(cluster_url, autocommit=True) as conn:
        conn.execute("UPDATE executors SET host = 'another-machine' WHERE executor_id = 'shared/0'")
    second = make_server(cluster_url, PARLEY_EXECUTOR_ID="shared", **CLUSTER_ENV)
    with pytest.raises(RuntimeError, match="exited at start"):
        second.start()
    assert "executor id 'shared/0' is in use by a live process on host 'another-machine'" in (
        second.log()
    )
    assert first.client().get("/healthz").status_code == 200


def test_sqlite_serves_one_process_per_data_directory(
    make_server: Callable[..., ParleyServer], tmp_path: Path
) -> None:
    first = make_server().start()
    second = make_server()
    second.data_dir = first.data_dir
    second.log_path = tmp_path / "second.log"
    with pytest.raises(RuntimeError, match="exited at start"):
        second.start()
    assert "is serving this data directory; SQLite serves one process at a time" in second.log()
    refused = subprocess.run(
        [*first_command(first), "--workers", "2"], env=first.env, capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert "several workers need PostgreSQL" in refused.stderr


def first_command(server: ParleyServer) -> list[str]:
    from tests.conftest import PARLEY

    return [str(PARLEY), "serve", "--port", "0", "--data-dir", str(server.data_dir)]


@pytest.fixture
def two_workers(
    make_server: Callable[..., ParleyServer], cluster_url: str
) -> Iterator[ParleyServer]:
    server = make_server(cluster_url, PARLEY_WORKERS="2", **CLUSTER_ENV).start()
    wait_for(lambda: len(executors(cluster_url)) == 2)
    yield server


def worker_pids(server: ParleyServer) -> set[int]:
    """The executors' processes that are children of the server's."""
    children = {child.pid for child in psutil.Process(server.pid).children()}
    return children & {row["pid"] for row in executors(server.env["DATABASE_URL"]).values()}


def test_two_workers_share_the_port_survive_a_kill_and_stop_together(
    two_workers: ParleyServer, cluster_url: str, provider: FakeProvider
) -> None:
    server = two_workers
    pids = worker_pids(server)
    assert len(pids) == 2, executors(cluster_url)
    provider.hold()
    user = unique("workers")
    texts: list[str] = []
    turn_ids: list[str] = []

    def running_by_executor() -> dict[str, int]:
        with psycopg.connect(cluster_url) as conn:
            return dict(
                conn.execute(
                    "SELECT executor_id, count(*) FROM dbos.workflow_status "
                    "WHERE status = 'PENDING' GROUP BY executor_id"
                ).fetchall()
            )

    # Batches of fresh connections, which the kernel spreads over the workers that have
    # finished starting, until both hold turns (a worker's executor row is claimed a
    # moment before it serves).
    with as_user(server.client(), user) as http:
        for index in range(64):
            conversation = new_conversation(http)
            text = unique(f"[hang] w{index}")
            with as_user(server.client(), user) as fresh:
                response = fresh.post(
                    f"/api/conversations/{conversation}/messages", json={"content": text}
                )
            assert response.status_code == 202
            texts.append(text)
            turn_ids.append(response.json()["turn_id"])
            if index % 16 == 15:
                wait_for(lambda: all(len(provider.calls_for(text)) == 1 for text in texts))
                if len(running_by_executor()) == 2:
                    break
    running = running_by_executor()
    with psycopg.connect(cluster_url) as conn:
        connections = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchone()
    assert len(running) == 2, f"both workers should run turns: {running}"
    # Within two workers' budget of 15 connections each.
    assert connections is not None and connections[0] <= 30

    victim_id = max(running, key=lambda executor: running[executor])
    victim = executors(cluster_url)[victim_id]["pid"]
    os.kill(victim, signal.SIGKILL)
    provider.release()
    with as_user(server.client(timeout=60), user) as http:
        for turn_id, text in zip(turn_ids, texts, strict=True):
            events = list(stream(http, turn_id))
            assert events[-1].event == "done", (text, events[-1])
            assert events[-1].data["message"]["content"] == reply_for(text)
    for text in texts:
        assert len(provider.calls_for(text)) <= 2
    wait_for(lambda: pending_turns(cluster_url) == 0)
    # The supervisor replaced the worker, which took its old slot back.
    wait_for(lambda: victim_id in executors(cluster_url))
    assert executors(cluster_url)[victim_id]["pid"] != victim

    children = psutil.Process(server.pid).children(recursive=True)
    server.stop()
    assert server.process is not None and server.process.returncode == 0
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def test_stop_delete_and_limits_hold_whichever_replica_is_asked(
    make_server: Callable[..., ParleyServer], cluster_url: str, provider: FakeProvider
) -> None:
    a, b = replicas(
        make_server,
        cluster_url,
        ["stop-a", "stop-b"],
        PARLEY_AUTH="accounts",
        PARLEY_CONCURRENT_TURNS="3",
        PARLEY_SESSION_SECRET="s" * 40,
    )
    from tests.test_accounts import Person

    person = Person(a, unique("carol"))
    assert person.signup().status_code == 201
    elsewhere = Person(b, person.name)
    assert elsewhere.login().status_code == 200

    provider.hold()
    conversations = [person.change("POST", "/api/conversations").json()["id"] for _ in range(8)]
    outcomes: list[int] = []

    def send_on(index: int) -> int:
        who = person if index % 2 == 0 else elsewhere
        response = who.change(
            "POST",
            f"/api/conversations/{conversations[index]}/messages",
            json={"content": unique("[hang] limited")},
        )
        return response.status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(send_on, range(8)))
    assert sorted(outcomes) == [202] * 3 + [429] * 5
    accepted = [c for c, code in zip(conversations, outcomes, strict=True) if code == 202]

    # Stop through B a turn that A or B writes; delete through A one that either writes.
    turn_of = {
        c: person.change("GET", f"/api/conversations/{c}/messages").json()["messages"][-1][
            "turn_id"
        ]
        for c in accepted
    }
    stopped = elsewhere.change("POST", f"/api/turns/{turn_of[accepted[0]]}/cancel")
    assert stopped.status_code == 200
    assert person.change("DELETE", f"/api/conversations/{accepted[1]}").status_code == 204
    provider.release()
    wait_for(lambda: pending_turns(cluster_url) == 0)
    last = person.change("GET", f"/api/conversations/{accepted[0]}/messages").json()
    assert last["messages"][-1]["status"] == "stopped"
    assert person.change("GET", f"/api/conversations/{accepted[1]}").status_code == 404
    assert (
        elsewhere.change("GET", f"/api/conversations/{accepted[2]}/messages").json()["messages"][
            -1
        ]["status"]
        == "complete"
    )


# The last release before executors had heartbeats: its processes run as one executor id
# each (``PARLEY_EXECUTOR_ID``, default "local"), with no row in ``executors``.
RELEASE_BEFORE_CLUSTERS = "73dfb58"


@pytest.fixture(scope="module")
def release_before_clusters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack_release(RELEASE_BEFORE_CLUSTERS, tmp_path_factory.mktemp("release"))


def test_a_rolling_upgrade_finishes_the_old_versions_turns_on_the_new_one(
    make_server: Callable[..., ParleyServer],
    cluster_url: str,
    provider: FakeProvider,
    release_before_clusters: Path,
) -> None:
    """One replica of the previous release and one of this one share the database; the
    old one dies mid-turn (as a deploy replacing it might leave it) and never comes back:
    the new one finishes its turn, exactly once, and its stream ends with ``done``."""
    old = make_server(
        cluster_url, PARLEY_EXECUTOR_ID="old-replica", PYTHONPATH=str(release_before_clusters)
    ).start()
    (new,) = replicas(make_server, cluster_url, ["new-replica"])
    user = unique("rolling")
    on_old = as_user(old.client(), user)
    conversation = new_conversation(on_old)
    text = unique("[hang] interrupted by the deploy")
    provider.hold()
    sent = on_old.post(f"/api/conversations/{conversation}/messages", json={"content": text})
    assert sent.status_code == 202
    turn_id = sent.json()["turn_id"]
    wait_for(lambda: len(provider.calls_for(text)) == 1)
    old.kill()
    provider.release()
    on_new = as_user(new.client(timeout=60), user)
    events = list(stream(on_new, turn_id))
    assert events[-1].event == "done", events[-1]
    assert events[-1].data["message"]["content"] == reply_for(text)
    assert len(provider.calls_for(text)) == 2
    assert "taking over the turns of processes with no heartbeat: old-replica" in new.log()
    follow_up = unique("after the deploy")
    send_and_finish(on_new, conversation, follow_up)
    assert provider.remembered(follow_up) == [text, reply_for(text)]
    wait_for(lambda: pending_turns(cluster_url) == 0)


# The last release before branches: its turns are "turns-2", and it has heartbeats.
RELEASE_BEFORE_BRANCHES = "6e10cf1"


@pytest.fixture(scope="module")
def release_before_branches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack_release(RELEASE_BEFORE_BRANCHES, tmp_path_factory.mktemp("release"))


def test_a_rolling_upgrade_from_before_branches_adopts_its_turns_and_waits_to_branch(
    make_server: Callable[..., ParleyServer],
    cluster_url: str,
    provider: FakeProvider,
    release_before_branches: Path,
) -> None:
    """A replica of the release before branches and one of this one share the database.
    While the old one runs, editing and regenerating answer 503 (it would store messages
    outside the branches); when it dies mid-turn, the new one adopts its turn and
    finishes it once, with the conversation as memory; then branching works."""
    old = make_server(
        cluster_url,
        PARLEY_EXECUTOR_ID="old-replica",
        PYTHONPATH=str(release_before_branches),
        **CLUSTER_ENV,
    ).start()
    (new,) = replicas(make_server, cluster_url, ["new-replica"])
    user = unique("rolling")
    on_old = as_user(old.client(), user)
    on_new = as_user(new.client(timeout=60), user)
    conversation = new_conversation(on_new)
    first = unique("first")
    send_and_finish(on_new, conversation, first)
    asked, reply = messages(on_new, conversation)[:2]
    path = f"/api/conversations/{conversation}/messages"
    for refused in (
        on_new.post(f"{path}/{reply['id']}/regenerate"),
        on_new.post(path, json={"content": "edited", "replaces": asked["id"]}),
    ):
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "30"
    assert len(stored(on_new, conversation)) == 2  # nothing stored by the refusals

    text = unique("[hang] sent through the old replica")
    provider.hold()
    sent = on_old.post(path, json={"content": text})
    assert sent.status_code == 202, sent.text
    turn_id = sent.json()["turn_id"]
    wait_for(lambda: len(provider.calls_for(text)) == 1)
    old.kill()
    provider.release()
    events = list(stream(on_new, turn_id))
    assert events[-1].event == "done", events[-1]
    assert len(provider.calls_for(text)) == 2
    assert "adopted 1 turns of an earlier version" in new.log()
    # Asked again by the new release, the model was shown the conversation before it.
    assert [m["content"] for m in provider.calls_for(text)[1].messages[1:-1]] == [
        first,
        reply_for(first),
    ]
    wait_for(lambda: pending_turns(cluster_url) == 0)
    # The message the old release stored is in the search index (kept by the database).
    hits = on_new.get("/api/search", params={"q": text}).json()["results"]
    assert {h["role"] for h in hits} == {"user", "assistant"}

    # The old replica is gone: branching works, and walks the old replica's messages too.
    def regenerated() -> bool:
        return on_new.post(f"{path}/{reply['id']}/regenerate").status_code == 202

    wait_for(regenerated, timeout=60)
    wait_for(lambda: messages(on_new, conversation)[-1]["status"] == "complete")
    old_branch = on_new.get(path, params={"leaf": reply["id"]}).json()["messages"]
    assert [m["content"] for m in old_branch] == [first, reply_for(first), text, reply_for(text)]
