"""The example's API under load: CPU per turn, turn time percentiles, turns/s, errors.

Starts the fake provider (a child process) answering after ``--latency`` seconds and
Parley (SQLite by default, PostgreSQL with ``--database-url``). N clients (the load
generator, in this process) each send ``POST /chat`` turn after turn, as distinct users,
for ``--seconds``. Parley's CPU is read from its process (psutil) over the measured span,
less its idle CPU, and divided by the turns served.

    .venv/bin/python bench/chat_load.py [--clients 50] [--latency 1.0] [--seconds 20]
                                        [--database-url URL]

The issue's targets: 5 ms of CPU or less per turn (50 clients, 1 s model); with 150
clients, median turn time 1.25 s or less and p99 2 s or less, no errors; 150 turns/s or
more with a model that answers at once, on PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx2
import psutil

from _support import add_database_argument, cpu_seconds, fake_provider, parley, storage, summary


async def load(url: str, clients: int, seconds: float) -> tuple[list[float], int]:
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx2.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        deadline = time.perf_counter() + seconds
        errors = 0

        async def client(index: int) -> list[float]:
            nonlocal errors
            found = []
            turn = 0
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                body = {"message": f"turn {turn}", "username": f"load-{index}"}
                response = await http.post("/chat", json=body)
                if response.status_code == 200:
                    found.append(time.perf_counter() - started)
                else:
                    errors += 1
                turn += 1
            return found

        per_client = await asyncio.gather(*(client(i) for i in range(clients)))
    return [t for times in per_client for t in times], errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[50, 150])
    parser.add_argument("--latency", type=float, default=1.0, help="the model's answer time")
    parser.add_argument("--seconds", type=float, default=20)
    add_database_argument(parser)
    args = parser.parse_args()

    env, storage_name = storage(args.database_url)
    print(f"storage: {storage_name}; the model answers after {args.latency * 1000:.0f} ms")
    with (
        tempfile.TemporaryDirectory() as data_dir,
        fake_provider(args.latency) as base_url,
        parley(Path(data_dir), OPENAI_BASE_URL=base_url, **env) as (url, pid),
    ):
        server = psutil.Process(pid)
        asyncio.run(load(url, 5, 2))  # warm-up: connections, first queries
        before = cpu_seconds(server)
        time.sleep(3)
        idle = (cpu_seconds(server) - before) / 3
        for clients in args.clients:
            started, served = time.perf_counter(), cpu_seconds(server)
            times, errors = asyncio.run(load(url, clients, args.seconds))
            wall = time.perf_counter() - started
            used = cpu_seconds(server) - served
            busy = used - idle * wall
            print(f"\n{clients} clients, {len(times)} turns in {wall:.1f} s, {errors} errors")
            print(f"  turn time:  {summary(times)}  (median {statistics.median(times):.3f} s)")
            print(f"  throughput: {len(times) / wall:.1f} turns/s")
            print(
                f"  Parley CPU: {busy / max(1, len(times)) * 1000:.2f} ms per turn above idle "
                f"({idle * 1000:.1f} ms/s idle); {used / wall:.0%} of a core"
            )


if __name__ == "__main__":
    main()
