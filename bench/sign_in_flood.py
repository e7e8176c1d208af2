"""A flood of failed sign-ins and of sign-ups, and what a signed-in bystander sees.

Starts the fake provider and Parley in accounts mode (SQLite by default, PostgreSQL with
``--database-url``) with its default limits, signs a bystander in, and has it read
``GET /api/conversations`` one request after another, in a process of its own, for the
whole run. Then, from this process (one client address), it fires ``--sign-ins``
failed sign-ins at once (wrong passwords, a different name each) and later ``--sign-ups``
sign-ups at once, and prints, for the bystander, its latency before the floods and
during each (from the first request of the flood to the last answer), and the answers
the flood got (401, 429, 503, ...).

    .venv/bin/python bench/sign_in_flood.py [--database-url URL] [--sign-ins 300]
                                            [--sign-ups 100] [--before SRC]

``--before SRC`` runs the same first on another source tree (``SRC`` is put first on
Parley's ``PYTHONPATH``), for a before/after figure:
``git worktree add /tmp/parley-before <commit>`` and ``--before /tmp/parley-before/src``.

On PostgreSQL the bench drops and re-creates the database named in the URL; never point
it at one you want to keep. The issue's target: the bystander's median under 50 ms
during a flood of 300 failed sign-ins, on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx2

from _support import add_database_argument, fake_provider, parley, percentile, storage

PASSWORD = "correct horse battery"


def bystander(
    url: str,
    cookies: dict[str, str],
    stop: multiprocessing.synchronize.Event,
    out: multiprocessing.connection.Connection,
) -> None:
    """Reads the conversation list one request after another until told to stop; sends
    back (start time, seconds, status) for each request."""
    timings: list[tuple[float, float, int]] = []
    with httpx2.Client(base_url=url, cookies=cookies, timeout=120) as http:
        while not stop.is_set():
            started = time.time()
            try:
                status = http.get("/api/conversations").status_code
            except httpx2.HTTPError:
                status = 0
            timings.append((started, time.time() - started, status))
            time.sleep(0.005)
    out.send(timings)


async def flood(url: str, path: str, bodies: list[dict[str, str]]) -> tuple[float, float, Counter]:
    """All of ``bodies`` posted to ``path`` at once; the span (wall-clock start and end)
    and the answers' statuses."""
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx2.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        # Connected first, so that the requests go out together.
        await asyncio.gather(*(http.get("/healthz") for _ in range(len(bodies))))

        async def one(body: dict[str, str]) -> int:
            try:
                return (await http.post(path, json=body)).status_code
            except httpx2.HTTPError:
                return 0

        started = time.time()
        answers = await asyncio.gather(*(one(body) for body in bodies))
        return started, time.time(), Counter(answers)


def during(timings: list[tuple[float, float, int]], start: float, end: float) -> str:
    seen = [t for t in timings if start <= t[0] <= end]
    if not seen:
        return "no request of the bystander's in this span"
    seconds = [t[1] for t in seen]
    failed = sum(1 for t in seen if t[2] != 200)
    p50, p99 = (percentile(seconds, f) * 1000 for f in (0.5, 0.99))
    return (
        f"p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   max {max(seconds) * 1000:7.1f} ms"
        f"   ({len(seen)} requests, {failed} not 200)"
    )


def answers(counted: Counter) -> str:
    return ", ".join(
        f"{count} x {status or 'no answer'}" for status, count in sorted(counted.items())
    )


def run(label: str, database_url: str | None, sign_ins: int, sign_ups: int, path: str) -> None:
    env, storage_name = storage(database_url)
    env |= {"PARLEY_AUTH": "accounts"}
    if path:
        env["PYTHONPATH"] = path + os.pathsep + os.environ.get("PYTHONPATH", "")
    with (
        tempfile.TemporaryDirectory() as data_dir,
        fake_provider() as provider_url,
        parley(Path(data_dir), OPENAI_BASE_URL=provider_url, **env) as (url, _pid),
    ):
        with httpx2.Client(base_url=url, timeout=60) as http:
            signed_up = http.post(
                "/api/auth/signup", json={"username": "bystander", "password": PASSWORD}
            )
            signed_up.raise_for_status()
            cookies = dict(http.cookies)
        stop = multiprocessing.Event()
        receiving, sending = multiprocessing.Pipe(duplex=False)
        poller = multiprocessing.Process(target=bystander, args=(url, cookies, stop, sending))
        poller.start()
        time.sleep(3)  # the bystander alone, for a baseline
        idle_end = time.time()
        wrong = [{"username": f"flood-{i}", "password": "wrong password!"} for i in range(sign_ins)]
        in_start, in_end, in_answers = asyncio.run(flood(url, "/api/auth/login", wrong))
        time.sleep(2)
        new = [{"username": f"new-{i}", "password": PASSWORD} for i in range(sign_ups)]
        up_start, up_end, up_answers = asyncio.run(flood(url, "/api/auth/signup", new))
        time.sleep(1)
        stop.set()
        timings = receiving.recv()
        poller.join()

    print(f"== {label}: storage {storage_name}")
    print(f"  bystander alone:            {during(timings, timings[0][0], idle_end)}")
    took = in_end - in_start
    print(f"  {sign_ins} failed sign-ins at once: answered in {took:.1f} s: {answers(in_answers)}")
    print(f"  bystander during them:      {during(timings, in_start, in_end)}")
    took = up_end - up_start
    print(f"  {sign_ups} sign-ups at once:        answered in {took:.1f} s: {answers(up_answers)}")
    print(f"  bystander during them:      {during(timings, up_start, up_end)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_database_argument(parser)
    parser.add_argument("--sign-ins", type=int, default=300)
    parser.add_argument("--sign-ups", type=int, default=100)
    parser.add_argument("--before", help="another source tree to measure first (its src dir)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores")
    if args.before:
        run(f"before ({args.before})", args.database_url, args.sign_ins, args.sign_ups, args.before)
    run("this tree", args.database_url, args.sign_ins, args.sign_ups, "")


if __name__ == "__main__":
    main()
