"""How far behind a reader on another replica gets a reply's pieces.

Starts the fake provider and two Parley replicas, ``a`` and ``b`` (one process each), on
one PostgreSQL database. ``--turns`` clients (50 by default) each start a turn on ``a``,
all within ``--ramp`` seconds, whose reply is ``--words`` words written ``--gap`` seconds
apart, and read its stream from the start twice at once: on ``a``, which writes it (its
pieces come live), and on ``b``, which gets them through the durable stream. For every
piece it records when each reader had it, and reports ``b``'s arrival minus ``a``'s, for
every piece and for the first piece of each reply, with each replica's CPU.

    .venv/bin/python bench/replica_stream.py [--turns 50] [--words 60] [--gap 0.05]
        [--database-url URL] [--before SRC]

``--before SRC`` runs the same first on another source tree (``SRC`` is put first on
Parley's ``PYTHONPATH``), for a before/after figure:
``git worktree add /tmp/parley-before <commit>`` and ``--before /tmp/parley-before/src``.
The database is dropped and re-created for each run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx2
import psutil

from _support import ROOT, cpu_seconds, fake_provider, parley, storage, summary

# The fake provider's replies and their pieces, as the tests know them.
sys.path.insert(0, str(ROOT))
from tests.fake_provider import reply_for, word_ends

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/parley_bench_replicas"


async def read(
    http: httpx2.AsyncClient, path: str, headers: dict[str, str]
) -> list[tuple[float, str, str]]:
    """A reply's stream: (arrival time, event, text) for each event."""
    seen: list[tuple[float, str, str]] = []
    async with http.stream("GET", path, headers=headers) as events:
        events.raise_for_status()
        event = ""
        async for line in events.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                text = json.loads(line.removeprefix("data: ")).get("text", "")
                seen.append((time.perf_counter(), event, text))
                if event != "token":
                    break
    return seen


def arrivals(seen: list[tuple[float, str, str]], ends: list[int]) -> list[float]:
    """When the reader had each piece: the text up to each of ``ends``."""
    found: list[float] = []
    length = 0
    for at, event, text in seen:
        if event == "reset":
            raise RuntimeError("the reply was written again")
        length += len(text)
        while len(found) < len(ends) and ends[len(found)] <= length:
            found.append(at)
    if len(found) < len(ends) or seen[-1][1] != "done":
        raise RuntimeError(f"the stream ended with {seen[-1][1]}, {length} characters in")
    return found


async def turn(
    on_a: httpx2.AsyncClient, on_b: httpx2.AsyncClient, index: int, delay: float, message: str
) -> list[float]:
    """One turn written on a and read on both; b's lag behind a for each piece."""
    headers = {"X-Parley-User": f"replica-{index}"}
    created = await on_a.post("/api/conversations", headers=headers)
    created.raise_for_status()
    conversation = created.json()["id"]
    await asyncio.sleep(delay)
    sent = await on_a.post(
        f"/api/conversations/{conversation}/messages", json={"content": message}, headers=headers
    )
    sent.raise_for_status()
    path = sent.json()["stream_url"]
    seen_a, seen_b = await asyncio.gather(read(on_a, path, headers), read(on_b, path, headers))
    ends = word_ends(reply_for(message))
    return [b - a for a, b in zip(arrivals(seen_a, ends), arrivals(seen_b, ends), strict=True)]


async def load(
    url_a: str, url_b: str, turns: int, ramp: float, message: str
) -> tuple[list[list[float]], list[str]]:
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        httpx2.AsyncClient(base_url=url_a, timeout=120, limits=limits) as on_a,
        httpx2.AsyncClient(base_url=url_b, timeout=120, limits=limits) as on_b,
    ):
        results = await asyncio.gather(
            *(turn(on_a, on_b, i, random.uniform(0, ramp), message) for i in range(turns)),
            return_exceptions=True,
        )
    lags = [result for result in results if isinstance(result, list)]
    errors = [repr(result) for result in results if isinstance(result, BaseException)]
    return lags, errors


def run(label: str, args: argparse.Namespace, source: str | None) -> None:
    env, _ = storage(args.database_url)
    env |= {"PARLEY_WORKERS": "1"}
    if source:
        env["PYTHONPATH"] = source + os.pathsep + os.environ.get("PYTHONPATH", "")
    message = f"[slow:{args.gap}] " + " ".join(f"w{i}" for i in range(args.words))
    with (
        tempfile.TemporaryDirectory() as dir_a,
        tempfile.TemporaryDirectory() as dir_b,
        fake_provider() as base_url,
        contextlib.ExitStack() as replicas,
    ):
        (url_a, pid_a), (url_b, pid_b) = (
            replicas.enter_context(
                parley(Path(data_dir), OPENAI_BASE_URL=base_url, PARLEY_EXECUTOR_ID=name, **env)
            )
            for name, data_dir in (("a", dir_a), ("b", dir_b))
        )
        processes = [psutil.Process(pid_a), psutil.Process(pid_b)]
        cpu_before = [cpu_seconds(process) for process in processes]
        started = time.perf_counter()
        lags, errors = asyncio.run(load(url_a, url_b, args.turns, args.ramp, message))
        wall = time.perf_counter() - started
        cpu = [cpu_seconds(p) - before for p, before in zip(processes, cpu_before, strict=True)]

    every = [lag for turn_lags in lags for lag in turn_lags]
    first = [turn_lags[0] for turn_lags in lags]
    print(f"== {label}")
    print(f"  {len(lags)} turns read to the end on a and on b, {len(errors)} errors, {wall:.1f} s")
    for error, count in Counter(errors).most_common(5):
        print(f"    {count} x {error}")
    if every:
        print(f"  every piece, b after a: {summary(every)}   ({len(every)} pieces)")
        print(f"  first piece, b after a: {summary(first)}")
        late = sum(lag > 0.1 for lag in every) / len(every)
        print(f"  pieces more than 100 ms behind: {late:.1%}; largest {max(every) * 1000:.0f} ms")
    turns = max(1, len(lags))
    print(
        f"  CPU: a {cpu[0]:.1f} s ({cpu[0] / turns * 1000:.0f} ms a turn), "
        f"b {cpu[1]:.1f} s ({cpu[1] / turns * 1000:.0f} ms a turn)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--words", type=int, default=60, help="pieces in each reply")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between pieces")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which turns start")
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="PostgreSQL URL (the bench drops and re-creates it)",
    )
    parser.add_argument("--before", help="another source tree to measure first (its src dir)")
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} cores")
    print(
        f"{args.turns} turns started on a within {args.ramp:.1f} s, each {args.words} pieces "
        f"{args.gap} s apart ({(args.words - 1) * args.gap:.1f} s), read on a and on b"
    )
    if args.before:
        run(f"before ({args.before})", args, args.before)
    run("this tree", args, None)


if __name__ == "__main__":
    main()
