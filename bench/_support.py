"""What the benchmarks share: starting Parley and the fake provider, and percentiles.

Each runs in a process of its own, apart from the load generator, so that Parley's CPU
figures are Parley's alone and the load generator does not steal its event loop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
PARLEY = Path(sys.executable).with_name("parley")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def fake_provider(latency: float = 0.0) -> Iterator[str]:
    """The tests' fake OpenAI-compatible server in a child process; yields its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_provider", "--latency", str(latency)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        yield process.stdout.readline().strip()
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def parley(data_dir: Path, **env: str) -> Iterator[tuple[str, int]]:
    """``parley serve`` in a child process; yields its URL and process id."""
    port = free_port()
    full_env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "DATABASE_URL")
    }
    # One process unless asked (``PARLEY_WORKERS``): figures per process stay comparable.
    full_env |= {"PARLEY_LOG_LEVEL": "warning", "PARLEY_WORKERS": "1", **env}
    log = (data_dir / "server.log").open("ab")
    process = subprocess.Popen(
        [str(PARLEY), "serve", "--port", str(port), "--data-dir", str(data_dir)],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"parley did not start; see {data_dir / 'server.log'}")
            try:
                if httpx.get(f"{url}/times", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float], unit: float = 1000.0) -> str:
    """Median, p95 and p99 of ``values`` (seconds), in milliseconds."""
    p50, p95, p99 = (percentile(values, f) * unit for f in (0.5, 0.95, 0.99))
    return f"p50 {p50:7.1f} ms   p95 {p95:7.1f} ms   p99 {p99:7.1f} ms"


def add_database_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url", help="PostgreSQL URL (default: SQLite files); the bench empties it"
    )


def storage(database_url: str | None) -> tuple[dict[str, str], str]:
    """Parley's environment for the storage asked for, and the storage's name.

    A PostgreSQL database is dropped and re-created first, so that every run starts empty.
    """
    if database_url is None:
        return {}, "SQLite"
    url = sa.make_url(database_url)
    admin = sa.create_engine(
        url.set(drivername="postgresql+psycopg", database="postgres"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{url.database}"'))
    admin.dispose()
    return {"PARLEY_DATABASE_URL": database_url}, "PostgreSQL"


def cpu_seconds(process: psutil.Process) -> float:
    """The CPU time, user and system, a process has used so far."""
    times = process.cpu_times()
    return times.user + times.system
