"""Fixtures: a fake model provider on loopback, PostgreSQL databases, Parley servers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, sync_playwright
from sqlalchemy.engine import make_url

from tests.fake_provider import FakeProvider

PARLEY = Path(sys.executable).with_name("parley")
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Three attempts, 50 ms apart at first: failing turns fail fast in tests.
QUICK_RETRIES = {
    "PARLEY_LLM_ATTEMPTS": "3",
    "PARLEY_LLM_RETRY_INTERVAL": "0.05",
    "PARLEY_LOG_LEVEL": "warning",
}
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider().start()
    yield fake
    fake.stop()


# --- PostgreSQL ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """A PostgreSQL URL to create throwaway databases from.

    Locally an unreachable server skips the PostgreSQL tests, saying so; in CI (``CI`` set)
    it fails them, so a green CI always means both databases were tested.
    """
    url = os.environ.get("PARLEY_TEST_DATABASE_URL", DEFAULT_PG_URL)
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.OperationalError as error:
        message = f"PostgreSQL not reachable at {url} (set PARLEY_TEST_DATABASE_URL): {error}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


class PostgresDatabases:
    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    def new_url(self) -> str:
        """The URL of a database that does not exist yet: Parley must create it."""
        name = f"parley_test_{uuid.uuid4().hex[:12]}"
        self.created.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_databases(pg_admin_url: str) -> Iterator[PostgresDatabases]:
    databases = PostgresDatabases(pg_admin_url)
    yield databases
    databases.drop_all()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, backend: str) -> str | None:
    """None for SQLite, else the URL of a fresh PostgreSQL database."""
    if backend == "sqlite":
        return None
    return request.getfixturevalue("postgres_databases").new_url()


ROOT = Path(__file__).resolve().parent.parent


def unpack_release(commit: str, into: Path) -> Path:
    """This repository's source at ``commit``, unpacked from git into ``into``: put it
    first on ``PYTHONPATH`` to run that release with the installed libraries."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "src"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


# --- Parley servers ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ParleyServer:
    """``parley serve`` in a child process, as a user would run it."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        # One process unless a test asks for workers: a test's signals and its kills
        # are meant for the process serving.
        self.env = {"PARLEY_WORKERS": "1", **os.environ, **env}
        for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "DATABASE_URL", "PARLEY_MODEL_PATH"):
            if name not in env:
                self.env.pop(name, None)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def start(self, timeout: float = 60) -> ParleyServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(PARLEY), "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"parley exited at start:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/times", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"parley did not become ready:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def count_in_dbos(self, table: str, where: str, *params: object) -> int:
        """Rows of one of DBOS's tables (``workflow_status``, ``streams``) matching a SQL
        condition with ``?`` placeholders, read straight from its database."""
        query = f"SELECT count(*) FROM {{}}{table} WHERE {where}"
        if "DATABASE_URL" not in self.env:
            with sqlite3.connect(self.data_dir / "dbos.sqlite") as conn:
                return int(conn.execute(query.format(""), params).fetchone()[0])
        with psycopg.connect(self.env["DATABASE_URL"]) as conn:
            cursor = conn.execute(query.format("dbos.").replace("?", "%s"), params)
            return int(cursor.fetchone()[0])  # type: ignore[index]


@pytest.fixture
def make_server(
    tmp_path_factory: pytest.TempPathFactory, provider: FakeProvider
) -> Iterator[object]:
    servers: list[ParleyServer] = []

    def make(
        database_url: str | None = None, *, local_model: bool = False, **env: str
    ) -> ParleyServer:
        full_env = {**QUICK_RETRIES, **env}
        if not local_model:
            full_env.setdefault("OPENAI_BASE_URL", provider.base_url)
        if database_url is not None:
            full_env["DATABASE_URL"] = database_url
        server = ParleyServer(tmp_path_factory.mktemp("parley"), full_env)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    provider: FakeProvider,
) -> Iterator[ParleyServer]:
    """One running Parley per backend, shared by a module's tests."""
    env = {"OPENAI_BASE_URL": provider.base_url, **QUICK_RETRIES}
    if request.param == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_databases").new_url()
    running = ParleyServer(tmp_path_factory.mktemp("parley"), env).start()
    yield running
    running.stop()


# The page's tests drive Debian's Chromium; a browser is never downloaded.
CHROMIUM = os.environ.get("PARLEY_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


AUTH_MODES = ["open", "accounts"]


def serve_in_mode(
    auth: str, tmp_path_factory: pytest.TempPathFactory, provider: FakeProvider
) -> Iterator[ParleyServer]:
    """A running Parley in an auth mode, for a module's fixture parametrized by mode."""
    running = ParleyServer(
        tmp_path_factory.mktemp(f"parley-{auth}"),
        {"OPENAI_BASE_URL": provider.base_url, "PARLEY_AUTH": auth, **QUICK_RETRIES},
    ).start()
    yield running
    running.stop()


@pytest.fixture
def client(server: ParleyServer) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


def unique(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
