"""SQLite with one Parley process against two on one data directory: what refusing
``--workers 2`` on SQLite forgoes.

Parley now serves one process per SQLite data directory, so the two-process side runs the
last release that allowed it (``73dfb58``, unpacked from this repository's git history and
put first on ``PYTHONPATH``); the one-process side runs the same release, so the two differ
only in the number of processes. The clients (``POST /chat``, each its own user) are dealt
out between the processes as a load balancer would. Rounds alternate one and two
processes, so the machine's noise falls on both alike.

    .venv/bin/python bench/sqlite_processes.py [--clients 150] [--seconds 15] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from _support import cpu_seconds, fake_provider, parley, summary
from chat_load import load

RELEASE = "73dfb58"
ROOT = Path(__file__).resolve().parent.parent


def unpack(release: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", release, "src"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def run(source: Path, processes: int, clients: int, seconds: float, latency: float) -> str:
    with contextlib.ExitStack() as stack:
        base_url = stack.enter_context(fake_provider(latency))
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        urls, servers = [], []
        for index in range(processes):
            url, pid = stack.enter_context(
                parley(
                    data_dir,
                    OPENAI_BASE_URL=base_url,
                    PARLEY_EXECUTOR_ID=f"sqlite-{index}",
                    PYTHONPATH=str(source),
                )
            )
            urls.append(url)
            servers.append(psutil.Process(pid))
        asyncio.run(load(urls, 5, 2))  # warm-up
        cpu_before, started = sum(cpu_seconds(s) for s in servers), time.perf_counter()
        times, errors = asyncio.run(load(urls, clients, seconds))
        wall = time.perf_counter() - started
        used = sum(cpu_seconds(s) for s in servers) - cpu_before
        return (
            f"{processes} process{'es' if processes > 1 else ''}, model {latency:.0f} s: "
            f"{len(times) / wall:6.1f} turns/s, {errors} errors, "
            f"CPU {used / max(1, len(times)) * 1000:5.1f} ms/turn, turn time {summary(times)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=150)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as unpacked:
        source = unpack(RELEASE, Path(unpacked))
        print(f"release {RELEASE}, SQLite, {args.clients} clients; rounds alternate 1 and 2")
        for latency in (0.0, 1.0):
            for _ in range(args.rounds):
                for processes in (1, 2):
                    line = run(source, processes, args.clients, args.seconds, latency)
                    print(line, flush=True)


if __name__ == "__main__":
    main()
