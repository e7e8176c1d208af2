"""The ``parley`` command as a user runs it."""

from __future__ import annotations

import http.client
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from parley import __version__
from tests.conftest import PARLEY, ParleyServer


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "DATABASE_URL")
    }
    return subprocess.run(
        [str(PARLEY), *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"parley {__version__}"


@pytest.mark.parametrize("command", [[], ["serve"], ["migrate"]])
def test_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: parley" in result.stdout


def test_serve_with_a_missing_model_file_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    result = run(
        "serve", "--data-dir", str(tmp_path / "data"), env={"PARLEY_MODEL_PATH": str(missing)}
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"parley: PARLEY_MODEL_PATH: no such file: {missing}"]
    assert not (tmp_path / "data").exists()


def test_bad_settings_are_one_clear_line(tmp_path: Path) -> None:
    result = run("serve", env={"DATABASE_URL": "mysql://x/y", "OPENAI_API_KEY": "k"})
    assert result.returncode == 1
    assert "DATABASE_URL must be a postgresql:// URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_migrate_creates_the_tables_on_sqlite(tmp_path: Path) -> None:
    result = run("migrate", "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(tmp_path / "parley.sqlite") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"conversations", "messages", "alembic_version"} <= tables


@pytest.mark.postgres
def test_migrate_creates_the_database_on_postgres(postgres_databases: object) -> None:
    import psycopg

    url = postgres_databases.new_url()  # type: ignore[attr-defined]
    result = run("migrate", env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    with psycopg.connect(url) as conn:
        tables = {
            row[0]
            for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
    assert {"conversations", "messages", "alembic_version"} <= tables


def test_idle_connections_outlive_a_clients_own_keep_alive(
    make_server: Callable[..., ParleyServer],
) -> None:
    """A client that waits 5 s between requests (httpx's idle expiry) must not send its
    next one on a connection the server is closing: the server keeps idle connections
    longer than clients do."""
    server = make_server().start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        assert (first.status, first.read()) == (200, b'{"status":"ok"}')
        connection = conn.sock
        time.sleep(6)
        # On the same connection: http.client reconnects only once it has seen it closed.
        conn.request("GET", "/healthz")
        again = conn.getresponse()
        assert (again.status, again.read()) == (200, b'{"status":"ok"}')
        assert conn.sock is connection
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("models", "says"),
    [
        ('[{"name": "a"', "it must be JSON"),
        ('[{"name": "a"}, {"name": "a"}]', "each model needs a name of its own"),
        ('[{"name": "a", "api_key": "sk-secret", "colour": 1}]', "models.0.colour"),
        ('[{"name": "gpt-3.5-turbo"}]', "is the default model's name"),
    ],
)
def test_bad_models_are_one_clear_line_without_keys(models: str, says: str) -> None:
    result = run("serve", env={"PARLEY_MODELS": models, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("parley: ") and says in line, line
    assert "sk-secret" not in result.stderr
