"""The usage meter's window arithmetic, and the figures summed across processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from parley.usage import UsageMeter, usage_samples
from tests.conftest import ParleyServer, PostgresDatabases, unique


def burn_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_time_counts_work_done_since_the_window_start() -> None:
    meter = UsageMeter(window=60)
    burn_cpu(0.2)
    # psutil reads the kernel's counters, which tick every 10 ms.
    assert 0.18 <= meter.snapshot().cpu_time < 1.0


def test_cpu_time_forgets_work_older_than_the_window() -> None:
    meter = UsageMeter(window=0.3, interval=0.05)
    burn_cpu(0.2)
    time.sleep(0.35)
    meter.sample()
    time.sleep(0.05)
    meter.sample()
    assert meter.snapshot().cpu_time < 0.05


def test_wall_clock_sums_the_turns_in_the_window() -> None:
    meter = UsageMeter(window=0.2)
    meter.record_turn(1.5)
    meter.record_turn(2.0)
    usage = meter.snapshot()
    assert usage.wall_clock_time == 3.5
    assert usage.turns == 2
    time.sleep(0.25)
    usage = meter.snapshot()
    assert usage.wall_clock_time == 0
    assert usage.turns == 0


def test_the_series_splits_the_history_into_buckets() -> None:
    meter = UsageMeter(window=60, interval=0.05)
    meter.record_turn(2.0)
    burn_cpu(0.1)
    series = meter.series(bucket_seconds=1.0, buckets=5)
    assert [bucket.seconds_ago for bucket in series] == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert series[-1].wall_clock_time == 2.0
    assert sum(bucket.wall_clock_time for bucket in series) == 2.0
    assert 0.08 <= sum(bucket.cpu_time for bucket in series) < 1.0
    assert all(bucket.model_cpu_time is None for bucket in series)


def test_each_process_counts_what_the_others_wrote_and_itself_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'usage.sqlite'}")
        async with engine.begin() as conn:
            await conn.run_sync(usage_samples.create, checkfirst=True)
        one, two = UsageMeter(cache_seconds=0), UsageMeter(cache_seconds=0)
        one.share(engine)
        two.share(engine)
        one.record_turn(1.5)
        one.record_turn(2.0)
        two.record_turn(4.0)
        two.model_cpu = lambda: 3.0
        for meter in (one, two):
            await meter.publish()
            await meter.publish()  # a second row holds only what came since the first
        for meter in (one, two):
            usage = await meter.service_snapshot()
            assert (usage.turns, usage.wall_clock_time) == (3, 7.5)
            assert usage.model_cpu_time is not None and 3.0 <= usage.model_cpu_time < 3.1
            series = await meter.service_series(bucket_seconds=1.0, buckets=5)
            assert sum(bucket.wall_clock_time for bucket in series) == 7.5
            assert all(bucket.model_cpu_time is not None for bucket in series)
        # Another process's CPU counts, as it wrote it. Both meters measure this process
        # here, so the work counts twice: as one's own, and in two's rows.
        before = (await one.service_snapshot()).cpu_time
        burn_cpu(0.2)
        await two.publish()
        assert (await one.service_snapshot()).cpu_time >= before + 0.36
        # A process that stopped keeps counting with what it wrote; its rows leave the
        # window as they age.
        await two.close()
        assert (await one.service_snapshot()).turns == 3
        one.window = 0.0
        assert (await one.service_snapshot()).turns == 0
        await engine.dispose()

    asyncio.run(scenario())


@pytest.mark.postgres
def test_every_process_shows_the_turns_and_cpu_of_all_of_them(
    make_server: Callable[..., ParleyServer], postgres_databases: PostgresDatabases
) -> None:
    """Two replicas on one database, one of them with two worker processes: /times on
    either reports the work of all."""
    url = postgres_databases.new_url()
    a = make_server(url, PARLEY_EXECUTOR_ID="a").start()
    b = make_server(url, PARLEY_EXECUTOR_ID="b", PARLEY_WORKERS="2").start()

    def cpu_seconds(server: ParleyServer) -> float:
        """The CPU seconds of the server's processes (its workers too, if it has any)."""
        process = psutil.Process(server.pid)
        total = 0.0
        for each in [process, *process.children(recursive=True)]:
            try:
                times = each.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def times(server: ParleyServer) -> dict[str, Any]:
        with server.client() as http:
            return http.get("/times").json()

    started = {server: cpu_seconds(server) for server in (a, b)}

    def chat(server: ParleyServer, name: str | None = None, text: str = "[delay:1] ahoy") -> None:
        with server.client() as http:
            reply = http.post("/chat", json={"message": text, "username": name or unique()})
            assert reply.status_code == 200, reply.text

    # Six turns of a second each: two on a, four on b.
    reader = unique()
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(chat, [a, a, b, b, b, b], [None] * 5 + [reader]))

    # Work b hard, with requests that are not turns, for some seconds of its CPU.
    def read_history(_: int) -> None:
        with b.client() as http:
            for _ in range(50):
                assert http.get(f"/history/{reader}").status_code == 200

    burn_deadline = time.monotonic() + 30
    while cpu_seconds(b) - started[b] < 3.0 and time.monotonic() < burn_deadline:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(read_history, range(8)))
    assert cpu_seconds(b) - started[b] >= 3.0
    spent = sum(cpu_seconds(server) - started[server] for server in (a, b))

    # Once each has written its figures (every 2 s), either one reports both's.
    deadline = time.monotonic() + 15
    while True:
        seen = {"a": times(a), "b": times(b)}
        if all(t["turns"] == 6 and t["cpu_time"] >= 0.95 * spent for t in seen.values()):
            break
        assert time.monotonic() < deadline, f"the two spent {spent:.2f} s of CPU: {seen}"
        time.sleep(0.5)
    for t in seen.values():
        assert t["wall_clock_time"] >= 6.0
        assert t["model_cpu_time"] is None
    time.sleep(2.5)  # another round of writes counts nothing twice
    assert [times(a)["turns"], times(b)["turns"]] == [6, 6]
    with a.client() as http:
        usage = http.get("/api/usage").json()
    assert usage["turns"] == 6
    assert sum(bucket["wall_clock_time"] for bucket in usage["series"]) >= 6.0
    assert sum(bucket["cpu_time"] for bucket in usage["series"]) >= 0.95 * spent

    # A last turn on b, then a clean stop: b writes its figures as it stops, and a still
    # counts b's turns after b is gone.
    chat(b, reader, "ahoy")
    b.stop()
    time.sleep(1.1)  # a's cache of the others' figures
    assert times(a)["turns"] == 7
