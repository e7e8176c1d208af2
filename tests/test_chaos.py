"""Chaos beyond the process: the database restarts under load; clients that never read."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.api_client import as_user, messages, new_conversation, send, stream, text_of
from tests.conftest import ParleyServer, free_port, unique
from tests.fake_provider import reply_for
from tests.test_durability import follow_to_the_end, retrying


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        pytest.fail(f"{name} not found: PostgreSQL's server programs are needed")
    return str(candidates[-1])


class ThrowawayPostgres:
    """A PostgreSQL cluster of the test's own (initdb, pg_ctl) on a free port.

    PostgreSQL refuses to run as root, so as root the cluster belongs to ``postgres``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.log = root / "postgres.log"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as, *command], check=True, capture_output=True, timeout=120)

    def init(self) -> ThrowawayPostgres:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust")
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "start")  # fmt: skip

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/parley"


@pytest.fixture
def throwaway_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawayPostgres]:
    cluster = ThrowawayPostgres(tmp_path_factory.mktemp("pg")).init()
    cluster.start()
    yield cluster
    with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
        cluster.stop()


def test_parley_keeps_serving_across_a_database_restart(
    make_server: Callable[..., ParleyServer], throwaway_postgres: ThrowawayPostgres
) -> None:
    server = make_server(
        throwaway_postgres.url,
        PARLEY_DB_TIMEOUT="2",
        PARLEY_LLM_RETRY_INTERVAL="0.2",
        PARLEY_LLM_ATTEMPTS="10",
    ).start()
    deadline = time.monotonic() + 180
    restarted = False

    def client(index: int) -> tuple[str, str, list[str]]:
        user = unique(f"db{index}")
        with as_user(server.client(timeout=30), user) as http:
            conversation = retrying(lambda: new_conversation(http), deadline)
            texts = []
            for turn in range(4):
                text = unique(f"[slow:0.1] c{index} t{turn} " + " ".join("w" * 8))
                key = f"turn-{turn}"
                turn_id = retrying(
                    lambda text=text, key=key: send(
                        http, conversation, text, **{"Idempotency-Key": key}
                    ),
                    deadline,
                )
                events = follow_to_the_end(http, turn_id, deadline)
                assert events[-1].event == "done", events[-1]
                assert text_of(events) == reply_for(text)
                texts.append(text)
        return user, conversation, texts

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, index) for index in range(8)]
        time.sleep(2)
        throwaway_postgres.stop()
        time.sleep(2)
        throwaway_postgres.start()
        restarted = True
        results = [future.result() for future in futures]

    assert restarted
    for user, conversation, texts in results:
        with as_user(server.client(), user) as http:
            stored = [(m["content"], m["status"]) for m in messages(http, conversation)]
            expected = []
            for text in texts:
                expected += [(text, "complete"), (reply_for(text), "complete")]
            assert stored == expected
    with server.client() as http:
        assert http.get("/readyz").status_code == 200


def test_clients_that_never_read_do_not_slow_the_others(
    make_server: Callable[..., ParleyServer],
) -> None:
    server = make_server(PARLEY_LOG_LEVEL="warning").start()
    user = unique("slowpoke")
    with as_user(server.client(), user) as http:
        conversation = new_conversation(http)
        # A long reply, so that unread streams have plenty to back up.
        long_text = unique("[slow:0.002] " + " ".join(f"word{i}" for i in range(3000)))
        turn_id = send(http, conversation, long_text)

    # 200 readers of that stream that read nothing at all.
    request = (
        f"GET /api/turns/{turn_id}/stream HTTP/1.1\r\nHost: x\r\nCookie: parley_user={user}\r\n\r\n"
    ).encode()
    sockets = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(request)
        sockets.append(sock)
    try:
        process = psutil.Process(server.pid)
        rss_before = process.memory_info().rss
        # Meanwhile, another user chats as usual.
        with as_user(server.client(timeout=30), unique()) as other:
            chat = new_conversation(other)
            started = time.monotonic()
            for index in range(3):
                text = f"quick {index}"
                events = list(stream(other, send(other, chat, text)))
                assert text_of(events) == reply_for(text)
            elapsed = time.monotonic() - started
        assert elapsed < 5, f"three quick turns took {elapsed:.1f} s beside 200 stuck readers"
        with server.client() as http:
            assert http.get("/healthz", timeout=2).status_code == 200
        grown = process.memory_info().rss - rss_before
        assert grown < 100 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB"
    finally:
        for sock in sockets:
            sock.close()
    # The long turn itself was never held back by its readers.
    with as_user(server.client(), user) as http:
        deadline = time.monotonic() + 60
        while messages(http, conversation)[-1]["status"] != "complete":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/healthz").status_code == 200
