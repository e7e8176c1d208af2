"""Chaos beyond the process: the database restarts under load; clients that never read."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

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
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    # Not under pytest's temporary directory: the postgres user could not reach it.
    root = Path(tempfile.mkdtemp(prefix="parley-pg-"))
    cluster = ThrowawayPostgres(root).init()
    cluster.start()
    yield cluster
    with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
        cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


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
    server = make_server(PARLEY_MAX_MESSAGE_CHARS="100000").start()
    user = unique("slowpoke")
    with as_user(server.client(), user) as http:
        conversation = new_conversation(http)
        # A long reply written fast (1,500 pieces, 250 a second), so that unread streams
        # have plenty to back up.
        long_text = unique("[slow:0.004] " + " ".join(f"word{i:05}" for i in range(1500)))
        turn_id = send(http, conversation, long_text)
    process = psutil.Process(server.pid)
    rss_before = process.memory_info().rss

    # 200 readers of that stream that read nothing at all.
    request = (
        f"GET /api/turns/{turn_id}/stream HTTP/1.1\r\n"
        f"Host: localhost\r\nCookie: parley_user={user}\r\n\r\n"
    ).encode()
    sockets = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(request)
        sockets.append(sock)
    try:
        # The turn itself is not held back by its readers.
        with as_user(server.client(), user) as http:
            deadline = time.monotonic() + 60
            while messages(http, conversation)[-1]["status"] != "complete":
                assert time.monotonic() < deadline, "the long turn did not finish"
                time.sleep(0.1)
        # With 200 streams stuck behind full buffers, another user chats as usual.
        with as_user(server.client(timeout=30), unique()) as other:
            chat = new_conversation(other)
            started = time.monotonic()
            for index in range(3):
                text = f"quick {index}"
                events = list(stream(other, send(other, chat, text)))
                assert text_of(events) == reply_for(text)
            elapsed = time.monotonic() - started
        assert elapsed < 2, f"three quick turns took {elapsed:.1f} s beside 200 stuck readers"
        with server.client() as http:
            assert http.get("/healthz", timeout=2).status_code == 200
        grown = process.memory_info().rss - rss_before
        assert grown < 100 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB"
        # They are real, open streams: the server answered each.
        assert sockets[0].recv(15) == b"HTTP/1.1 200 OK"
    finally:
        for sock in sockets:
            sock.close()
    with server.client() as http:
        assert http.get("/healthz").status_code == 200


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 32 MiB file system of the test's own (tmpfs), to fill up."""
    mount_point = Path(tempfile.mkdtemp(prefix="parley-disk-"))
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        pytest.fail(f"this test mounts a tmpfs and needs root to: {error}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)
    mount_point.rmdir()


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 2**20)
                out.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_is_reported_and_survived(
    make_server: Callable[..., ParleyServer], small_disk: Path
) -> None:
    server = make_server(PARLEY_LOG_LEVEL="warning")
    server.data_dir = small_disk / "data"
    server.start()
    user = unique()
    with as_user(server.client(), user) as http:
        conversation = new_conversation(http)
        before = unique("before")
        assert text_of(list(stream(http, send(http, conversation, before)))) == reply_for(before)

        filler = fill(small_disk)
        refused = http.post(f"/api/conversations/{conversation}/messages", json={"content": "no"})
        assert refused.status_code == 503, refused.text
        assert "storage" in refused.json()["detail"]
        assert refused.headers["retry-after"] == "1"
        filler.unlink()  # space returns
        after = unique("after")
        assert text_of(list(stream(http, send(http, conversation, after)))) == reply_for(after)
        contents = [m["content"] for m in messages(http, conversation) if m["role"] == "user"]
    assert contents == [before, after]  # the refused message left nothing behind
    assert "storage" in server.log()
    server.stop()
    for name in ("dbos.sqlite", "parley.sqlite", "memory.sqlite"):
        with sqlite3.connect(server.data_dir / name) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",), name
