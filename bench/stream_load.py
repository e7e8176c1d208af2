"""Many long streaming chats held at once by one Parley process.

Starts the fake provider and Parley, then ``--streams`` clients (1,000 by default) each
open a conversation and, all within ``--ramp`` seconds, send one message whose reply is
50 words written over 10 s (the first at once, then one every 0.2 s) and read its event
stream to the end. Reports the turn times (send to the ``done`` event) against the
model's own 10 s, errors, Parley's resident memory at its peak and its CPU.

    .venv/bin/python bench/stream_load.py [--streams 1000] [--database-url URL]

The issue's target: no errors, median within 10% of 10 s, p99 within 25%, resident
memory under 1 GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx2
import psutil

from _support import add_database_argument, cpu_seconds, fake_provider, parley, storage, summary

WORDS = 50
GAP = 0.2
REPLY = f"[slow:{GAP}] " + " ".join(f"w{i}" for i in range(WORDS))
MODEL_SECONDS = (WORDS - 1) * GAP


async def chat(http: httpx2.AsyncClient, index: int, delay: float) -> float:
    headers = {"X-Parley-User": f"stream-{index}"}
    created = await http.post("/api/conversations", headers=headers)
    created.raise_for_status()
    conversation = created.json()["id"]
    await asyncio.sleep(delay)
    started = time.perf_counter()
    response = await http.post(
        f"/api/conversations/{conversation}/messages", json={"content": REPLY}, headers=headers
    )
    response.raise_for_status()
    tokens = 0
    async with http.stream("GET", response.json()["stream_url"], headers=headers) as events:
        event = ""
        async for line in events.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
                if event == "token":
                    tokens += 1
                elif event == "done":
                    break
                elif event in ("error", "stopped"):
                    raise RuntimeError(f"the turn ended {event}")
    if event != "done" or tokens == 0:
        raise RuntimeError("the stream ended early")
    return time.perf_counter() - started


async def load(url: str, streams: int, ramp: float) -> tuple[list[float], list[str]]:
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx2.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        results = await asyncio.gather(
            *(chat(http, i, random.uniform(0, ramp)) for i in range(streams)),
            return_exceptions=True,
        )
    times = [r for r in results if isinstance(r, float)]
    errors = [describe(r) for r in results if isinstance(r, BaseException)]
    return times, errors


def describe(error: BaseException) -> str:
    if isinstance(error, httpx2.HTTPStatusError):
        request = error.request
        route = request.url.path.rsplit("/", 1)[-1]  # ids left out, so that errors group
        return f"HTTP {error.response.status_code} from {request.method} .../{route}"
    return repr(error)


class Peak(threading.Thread):
    """The largest resident set size of a process, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.rss = self.process.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.rss = max(self.rss, self.process.memory_info().rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--ramp", type=float, default=5, help="seconds over which turns start")
    add_database_argument(parser)
    args = parser.parse_args()

    env, storage_name = storage(args.database_url)
    print(f"storage: {storage_name}")
    print(f"{args.streams} streams, each a {WORDS}-word reply over {MODEL_SECONDS:.1f} s")
    with (
        tempfile.TemporaryDirectory() as data_dir,
        fake_provider() as base_url,
        parley(Path(data_dir), OPENAI_BASE_URL=base_url, **env) as (url, pid),
    ):
        server = psutil.Process(pid)
        before_rss = server.memory_info().rss
        peak = Peak(pid)
        peak.start()
        cpu_before, started = cpu_seconds(server), time.perf_counter()
        times, errors = asyncio.run(load(url, args.streams, args.ramp))
        wall = time.perf_counter() - started
        cpu = cpu_seconds(server) - cpu_before
        peak.done.set()

    median = statistics.median(times) if times else float("nan")
    p99 = sorted(times)[round(0.99 * (len(times) - 1))] if times else float("nan")
    print(f"\n{len(times)} turns completed, {len(errors)} errors in {wall:.1f} s")
    for error, count in Counter(errors).most_common(5):
        print(f"  {count} x {error}")
    print(f"  turn time: {summary(times)}")
    print(
        f"  against the model's {MODEL_SECONDS:.1f} s: median +{median / MODEL_SECONDS - 1:.1%}, "
        f"p99 +{p99 / MODEL_SECONDS - 1:.1%}"
    )
    print(
        f"  Parley resident memory: {before_rss / 2**20:.0f} MiB before, "
        f"{peak.rss / 2**20:.0f} MiB at the peak"
    )
    print(
        f"  Parley CPU: {cpu:.1f} s in all, {cpu / max(1, len(times)) * 1000:.1f} ms per turn, "
        f"{cpu / wall:.0%} of a core"
    )


if __name__ == "__main__":
    main()
