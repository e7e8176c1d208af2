"""The usage meter's window arithmetic, and the figures summed across processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psutil
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from parley.api.usage import usage as usage_route
from parley.store import ensure_postgres_database
from parley.usage import UsageMeter, usage_samples
from tests.conftest import BACKENDS, ParleyServer, PostgresDatabases, unique
from tests.fake_provider import FakeProvider


class Clock:
    """A monotonic clock a test moves by hand, so that turn-seconds are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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


def test_wall_clock_is_the_turn_seconds_inside_the_window_running_turns_too() -> None:
    clock = Clock()
    meter = UsageMeter(window=10, clock=clock)
    meter.turn_started("a")
    clock.advance(3)
    # A turn still being written counts for the part of it that has run.
    assert (meter.snapshot().wall_clock_time, meter.snapshot().turns) == (3.0, 0)
    meter.turn_started("b")
    meter.turn_started("a")  # started again (a workflow run again): its first start stands
    clock.advance(2)
    assert (meter.snapshot().wall_clock_time, meter.snapshot().turns) == (7.0, 0)  # 5 + 2
    meter.turn_ended("a")
    meter.turn_ended("unknown")  # never started here: nothing to count
    clock.advance(4)
    assert (meter.snapshot().wall_clock_time, meter.snapshot().turns) == (11.0, 1)  # 5 + 6
    # The window is [1003, 1013]: a counts for its 2 s inside it, b for all of its 10.
    clock.advance(4)
    assert (meter.snapshot().wall_clock_time, meter.snapshot().turns) == (12.0, 1)
    meter.turn_ended("b")
    clock.advance(5)
    assert (meter.snapshot().wall_clock_time, meter.snapshot().turns) == (5.0, 1)  # b's last 5
    clock.advance(5.5)
    assert (meter.snapshot().wall_clock_time, meter.snapshot().turns) == (0.0, 0)
    # A turn of known length that ended now counts whole, inside the window.
    meter.record_turn(2.5)
    assert (meter.snapshot().wall_clock_time, meter.snapshot().turns) == (2.5, 1)


def test_the_series_splits_the_history_into_buckets() -> None:
    clock = Clock()
    meter = UsageMeter(window=60, interval=0.05, clock=clock)
    clock.advance(0.5)
    meter.turn_started("running")
    clock.advance(1.0)
    meter.record_turn(0.25)  # [1001.25, 1001.5]
    clock.advance(1.5)
    burn_cpu(0.1)
    # Now 1003: buckets [998, 999], ..., [1002, 1003]; the running turn began at 1000.5.
    series = meter.series(bucket_seconds=1.0, buckets=5)
    assert [bucket.seconds_ago for bucket in series] == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert [bucket.wall_clock_time for bucket in series] == [0.0, 0.0, 0.5, 1.25, 1.0]
    assert meter.snapshot().wall_clock_time == 2.75
    assert 0.08 <= sum(bucket.cpu_time for bucket in series) < 1.0
    assert all(bucket.model_cpu_time is None for bucket in series)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_each_process_counts_what_the_others_wrote_and_itself_once(
    database_url: str | None, tmp_path: Path
) -> None:
    if database_url is None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'usage.sqlite'}")
    else:
        await ensure_postgres_database(database_url)
        engine = create_async_engine(sa.make_url(database_url).set(drivername="postgresql+asyncpg"))
    async with engine.begin() as conn:
        await conn.run_sync(usage_samples.create, checkfirst=True)
    clocks = Clock(), Clock()
    one, two = (UsageMeter(cache_seconds=0, clock=clock) for clock in clocks)
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
    # A turn still running on two counts on one, as far as two's rows have reached.
    two.turn_started("long")
    clocks[1].advance(3)
    await two.publish()
    assert (await one.service_snapshot()).wall_clock_time == 10.5  # 7.5, and 3 of it
    clocks[1].advance(2)
    assert (await one.service_snapshot()).wall_clock_time == 10.5  # not written yet
    await two.publish()
    assert (await one.service_snapshot()).wall_clock_time == 12.5
    two.turn_ended("long")
    clocks[1].advance(1)
    await two.publish()  # the turn ended: nothing more accrues
    usage = await one.service_snapshot()
    assert (usage.turns, usage.wall_clock_time) == (4, 12.5)
    series = await one.service_series(bucket_seconds=1.0, buckets=5)
    assert sum(bucket.wall_clock_time for bucket in series) == 12.5
    # Another process's CPU counts, as it wrote it. Both meters measure this process
    # here, so the work counts twice: as one's own, and in two's rows.
    before = (await one.service_snapshot()).cpu_time
    burn_cpu(0.2)
    await two.publish()
    assert (await one.service_snapshot()).cpu_time >= before + 0.36
    # A process that stopped keeps counting with what it wrote; its rows leave the
    # window as they age.
    await two.close()
    assert (await one.service_snapshot()).turns == 4
    one.window = 0.0
    clocks[0].advance(1)
    assert (await one.service_snapshot()).turns == 0
    await engine.dispose()


async def test_cpu_billed_is_parleys_cpu_and_the_models_is_apart() -> None:
    """The comparison is Parley's CPU against its chats' wall-clock time; the model's CPU
    is reported, and priced, apart."""
    clock = Clock()
    meter = UsageMeter(window=60, clock=clock)
    model_cpu = [10.0]
    meter.model_cpu = lambda: model_cpu[0]
    clock.advance(400)  # the first sample (no model yet) out of the window and the chart
    meter.sample()  # the model's counter from here
    meter.turn_started("running")
    model_cpu[0] += 6.0
    clock.advance(4)
    settings = SimpleNamespace(price_cpu_second=0.5, price_request_second=0.25)
    request = SimpleNamespace(
        app=SimpleNamespace(state=SimpleNamespace(usage=meter, settings=settings))
    )
    usage = await usage_route(request)  # type: ignore[arg-type]
    assert (usage.wall_clock_time, usage.model_cpu_time, usage.turns) == (4.0, 6.0, 0)
    costs = usage.costs
    assert costs.cpu_billed == usage.cpu_time * 0.5  # Parley's CPU alone
    assert costs.duration_billed == 1.0  # 4 s of a turn still running
    assert costs.model_cpu_billed == 3.0
    assert sum(bucket.wall_clock_time for bucket in usage.series) == 4.0
    assert sum(bucket.model_cpu_time or 0.0 for bucket in usage.series) == 6.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reply_still_being_written_counts_while_it_runs(
    make_server: Callable[..., ParleyServer], provider: FakeProvider, database_url: str | None
) -> None:
    server = make_server(database_url).start()
    text = unique("[hang] a reply that takes its time")
    outcome: dict[str, httpx.Response] = {}

    def ask() -> None:
        with server.client(timeout=90) as http:
            outcome["reply"] = http.post("/chat", json={"message": text, "username": unique()})

    def usage(http: httpx.Client) -> tuple[float, dict[str, Any], float]:
        before = time.time()
        body = http.get("/api/usage").json()
        return before, body, time.time()

    provider.hold()
    sent = time.time()
    asking = threading.Thread(target=ask)
    asking.start()
    try:
        deadline = time.monotonic() + 15
        while not provider.calls_for(text):
            assert time.monotonic() < deadline, "the turn never reached the model"
            time.sleep(0.05)
        (call,) = provider.calls_for(text)
        with server.client() as http:
            for _ in range(2):
                time.sleep(1.0)
                before, body, after = usage(http)
                # The turn began after it was sent and before the model was asked, and it
                # has not ended: its seconds so far are the figure, and nothing finished.
                assert before - call.at <= body["wall_clock_time"] <= after - sent
                assert body["turns"] == 0
                series = sum(bucket["wall_clock_time"] for bucket in body["series"])
                assert before - call.at <= series <= after - sent
                assert body["costs"]["duration_billed"] == (
                    body["wall_clock_time"] * body["costs"]["price_request_second"]
                )
        released = time.time()
    finally:
        provider.release()
    asking.join(timeout=60)
    assert outcome["reply"].status_code == 200, outcome["reply"].text
    answered = time.time()
    with server.client() as http:
        _, first, _ = usage(http)
        time.sleep(1.1)
        _, second, _ = usage(http)
    # Ended: the turn's whole length, which no longer grows.
    assert first["turns"] == second["turns"] == 1
    assert first["wall_clock_time"] == second["wall_clock_time"]
    assert released - call.at <= first["wall_clock_time"] <= answered - sent
    assert sum(b["wall_clock_time"] for b in first["series"]) == pytest.approx(
        first["wall_clock_time"], abs=1e-9
    )
    costs = first["costs"]
    assert costs["cpu_billed"] == first["cpu_time"] * costs["price_cpu_second"]
    assert first["model_cpu_time"] is None and costs["model_cpu_billed"] is None


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
