"""The usage meter's window arithmetic."""

from __future__ import annotations

import time

from parley.usage import UsageMeter


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
