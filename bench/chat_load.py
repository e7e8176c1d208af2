"""The example's API under load: CPU per turn, turn time percentiles, turns/s, errors.

Starts the fake provider (a child process) answering after ``--latency`` seconds and
Parley (SQLite by default, PostgreSQL with ``--database-url``). N clients (the load
generator, in this process) each send ``POST /chat`` turn after turn, as distinct users,
for ``--seconds``. Parley's CPU is read from its process (psutil) over the measured span,
less its idle CPU, and divided by the turns served.

With ``--processes`` above 1, that many Parley processes share the PostgreSQL database,
as replicas do (each with its own executor id), and the clients are dealt out among them
as a load balancer would; the CPU figures are their sum.

    .venv/bin/python bench/chat_load.py [--clients 50] [--latency 1.0] [--seconds 20]
                                        [--database-url URL] [--processes 1]

The issue's targets: 5 ms of CPU or less per turn (50 clients, 1 s model); with 150
clients, median turn time 1.25 s or less and p99 2 s or less, no errors; 150 turns/s or
more with a model that answers at once, on PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import httpx2
import psutil

from _support import add_database_argument, cpu_seconds, fake_provider, parley, storage, summary


async def load(urls: list[str], clients: int, seconds: float) -> tuple[list[float], int]:
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with contextlib.AsyncExitStack() as stack:
        https = [
            await stack.enter_async_context(
                httpx2.AsyncClient(base_url=url, timeout=120, limits=limits)
            )
            for url in urls
        ]
        deadline = time.perf_counter() + seconds
        errors = 0

        async def client(index: int) -> list[float]:
            nonlocal errors
            http = https[index % len(https)]
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
    parser.add_argument(
        "--processes", type=int, default=1, help="Parley processes sharing the PostgreSQL database"
    )
    add_database_argument(parser)
    args = parser.parse_args()
    if args.processes > 1 and args.database_url is None:
        parser.error("--processes above 1 needs --database-url: replicas share PostgreSQL")

    env, storage_name = storage(args.database_url)
    print(f"storage: {storage_name}; the model answers after {args.latency * 1000:.0f} ms")
    if args.processes > 1:
        print(f"{args.processes} Parley processes, the clients dealt out among them")
    with contextlib.ExitStack() as stack:
        base_url = stack.enter_context(fake_provider(args.latency))
        urls, servers = [], []
        for index in range(args.processes):
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            url, pid = stack.enter_context(
                parley(
                    data_dir, OPENAI_BASE_URL=base_url, PARLEY_EXECUTOR_ID=f"bench-{index}", **env
                )
            )
            urls.append(url)
            servers.append(psutil.Process(pid))

        def parley_cpu() -> float:
            return sum(cpu_seconds(server) for server in servers)

        asyncio.run(load(urls, 5, 2))  # warm-up: connections, first queries
        before = parley_cpu()
        time.sleep(3)
        idle = (parley_cpu() - before) / 3
        for clients in args.clients:
            started, served = time.perf_counter(), parley_cpu()
            times, errors = asyncio.run(load(urls, clients, args.seconds))
            wall = time.perf_counter() - started
            used = parley_cpu() - served
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
