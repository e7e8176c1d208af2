"""Time to the first token: what Parley adds to the provider's own.

Starts the fake provider (a child process) with a fixed first-token latency and Parley on
the embedded storage (or PostgreSQL with ``--database-url``). For each concurrency level N,
N clients each chat in a conversation of their own for ``--seconds``: send a message, read
its reply stream to the end (17 words, 50 ms apart, about a second), send the next. So N
streams are open at every moment and turns start at staggered times, as with real users.
Each turn is timed from sending ``POST .../messages`` to the first ``token`` event of
``GET /api/turns/{id}/stream``. The provider's own first-token time is measured straight
against it, at the same concurrency. A burst (N turns started at the same instant) is also
timed once: there the turns' start-up work queues for Parley's one core.

    .venv/bin/python bench/first_token.py [--concurrency 1 10 100] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx2
import psutil

from _support import add_database_argument, cpu_seconds, fake_provider, parley, storage, summary

REPLY = "[slow:0.05] " + " ".join(f"w{i}" for i in range(16))


async def provider_first_token(http: httpx2.AsyncClient, base_url: str) -> float:
    body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": REPLY}]}
    started = time.perf_counter()
    first = None
    async with http.stream("POST", f"{base_url}/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: ") and '"content"' in line:
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the provider sent no token")
    return first


async def new_conversation(http: httpx2.AsyncClient, index: int) -> str:
    headers = {"X-Parley-User": f"bench-{index}"}
    return str((await http.post("/api/conversations", headers=headers)).json()["id"])


async def parley_first_token(
    http: httpx2.AsyncClient, index: int, conversation: str | None = None
) -> float:
    headers = {"X-Parley-User": f"bench-{index}"}
    conversation = conversation or await new_conversation(http, index)
    started = time.perf_counter()
    response = await http.post(
        f"/api/conversations/{conversation}/messages", json={"content": REPLY}, headers=headers
    )
    response.raise_for_status()
    first = None
    async with http.stream("GET", response.json()["stream_url"], headers=headers) as events:
        event = ""
        async for line in events.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "token" and first is None:
                first = time.perf_counter() - started
            elif line.startswith("data: ") and event in ("error", "stopped"):
                raise RuntimeError(json.loads(line.removeprefix("data: ")))
    if first is None:
        raise RuntimeError("no token")
    return first


async def steady(
    url: str, base_url: str, concurrency: int, seconds: float
) -> tuple[list[float], list[float]]:
    """First-token times of N clients chatting for ``seconds``: straight to the provider
    for a third of the time, then through Parley."""
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx2.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def loop(seconds: float, turn: Callable[[], Awaitable[float]]) -> list[float]:
            deadline = time.perf_counter() + seconds
            found = []
            while time.perf_counter() < deadline:
                found.append(await turn())
            return found

        async def direct(index: int) -> list[float]:
            return await loop(seconds / 3, lambda: provider_first_token(http, base_url))

        async def via(index: int) -> list[float]:
            conversation = await new_conversation(http, index)
            return await loop(seconds, lambda: parley_first_token(http, index, conversation))

        straight = await asyncio.gather(*(direct(i) for i in range(concurrency)))
        # Warm the path once (first connections, first queries) before timing it.
        await parley_first_token(http, -1)
        through = await asyncio.gather(*(via(i) for i in range(concurrency)))
    return _flat(straight), _flat(through)


def _flat(lists: list[list[float]]) -> list[float]:
    return [value for values in lists for value in values]


async def burst(url: str, concurrency: int) -> list[float]:
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx2.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        return list(
            await asyncio.gather(*(parley_first_token(http, i) for i in range(concurrency)))
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--seconds", type=float, default=15, help="per concurrency level")
    parser.add_argument("--latency", type=float, default=0.2, help="provider's first-token s")
    add_database_argument(parser)
    args = parser.parse_args()

    env, storage_name = storage(args.database_url)
    print(f"storage: {storage_name}; provider first token after {args.latency * 1000:.0f} ms")
    with (
        tempfile.TemporaryDirectory() as data_dir,
        fake_provider(args.latency) as base_url,
        parley(Path(data_dir), OPENAI_BASE_URL=base_url, **env) as (url, pid),
    ):
        server = psutil.Process(pid)
        before = cpu_seconds(server)
        time.sleep(5)
        idle = (cpu_seconds(server) - before) / 5
        print(f"Parley idle: {idle * 1000:.1f} ms of CPU per second (sampler, DBOS's pollers)")
        for concurrency in args.concurrency:
            started, cpu, served = time.perf_counter(), time.process_time(), cpu_seconds(server)
            direct, via = asyncio.run(steady(url, base_url, concurrency, args.seconds))
            wall = time.perf_counter() - started
            client_cpu = time.process_time() - cpu
            # Parley's CPU over the part through Parley: all but the first third.
            server_cpu = cpu_seconds(server) - served - idle * wall
            bursting = asyncio.run(burst(url, concurrency))
            added = statistics.median(via) - statistics.median(direct)
            print(f"\n{concurrency} concurrent streams, {len(via)} turns")
            print(f"  provider directly:  {summary(direct)}")
            print(f"  through Parley:     {summary(via)}")
            print(f"  Parley adds at the median: {added * 1000:.1f} ms")
            print(f"  {concurrency} started at once: {summary(bursting)}")
            print(
                f"  Parley's CPU above idle: {server_cpu / len(via) * 1000:.1f} ms per turn; "
                f"load generator {client_cpu / wall:.0%} of a core"
            )


if __name__ == "__main__":
    main()
