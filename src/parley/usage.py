"""CPU time against wall-clock time, over a sliding window: the figures on the page.

CPU time is a process's user + system time from psutil: its reading now less the reading
sampled, once a second, at the window's start. Parley's own process and the embedded
model's process (when one runs) are measured apart. The wall-clock figure is the summed
duration of the chat turns that finished in the window.

The meter keeps ``history`` seconds of samples, from which ``series`` draws the page's
chart: the same three figures per bucket of time over the last minutes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class Bucket:
    seconds_ago: float  # when the bucket ends, counted back from now
    cpu_time: float
    model_cpu_time: float | None
    wall_clock_time: float


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_time: float
    model_cpu_time: float | None
    wall_clock_time: float
    turns: int
    window_seconds: float


class UsageMeter:
    def __init__(self, window: float = 60.0, interval: float = 1.0, history: float = 600.0) -> None:
        self.window = window
        self.interval = interval
        self.history = max(history, window)
        self._process = psutil.Process()
        # Cumulative CPU seconds of the embedded model's processes, when there is one.
        self.model_cpu: Callable[[], float] | None = None
        self._samples: deque[tuple[float, float, float]] = deque()
        self._turns: deque[tuple[float, float]] = deque()
        self.sample()

    def _own_cpu(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    def _model_cpu(self) -> float:
        return self.model_cpu() if self.model_cpu is not None else 0.0

    def sample(self) -> None:
        now = time.monotonic()
        self._samples.append((now, self._own_cpu(), self._model_cpu()))
        # Keep one sample at or before the history's start, to measure from it.
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.history:
            self._samples.popleft()
        while self._turns and self._turns[0][0] < now - self.history:
            self._turns.popleft()

    def record_turn(self, seconds: float) -> None:
        self._turns.append((time.monotonic(), seconds))

    def snapshot(self) -> Usage:
        now = time.monotonic()
        _, own_start, model_start = self._sample_at(now - self.window)
        turns = [seconds for at, seconds in self._turns if at >= now - self.window]
        return Usage(
            cpu_time=max(0.0, self._own_cpu() - own_start),
            model_cpu_time=(
                max(0.0, self._model_cpu() - model_start) if self.model_cpu is not None else None
            ),
            wall_clock_time=sum(turns),
            turns=len(turns),
            window_seconds=self.window,
        )

    def series(self, bucket_seconds: float = 10.0, buckets: int = 30) -> list[Bucket]:
        """The figures per bucket of ``bucket_seconds``, oldest first, ending now."""
        now = time.monotonic()
        edges = [now - bucket_seconds * k for k in range(buckets, -1, -1)]
        readings = [self._sample_at(edge) for edge in edges[:-1]]
        readings.append((now, self._own_cpu(), self._model_cpu()))
        out = []
        for (_, own_a, model_a), (_, own_b, model_b), edge in zip(
            readings, readings[1:], edges[1:], strict=False
        ):
            out.append(
                Bucket(
                    seconds_ago=round(now - edge, 3),
                    cpu_time=max(0.0, own_b - own_a),
                    model_cpu_time=(
                        max(0.0, model_b - model_a) if self.model_cpu is not None else None
                    ),
                    wall_clock_time=sum(
                        seconds for at, seconds in self._turns if edge - bucket_seconds < at <= edge
                    ),
                )
            )
        return out

    def _sample_at(self, moment: float) -> tuple[float, float, float]:
        """The first sample at or after ``moment`` (the oldest one if none is)."""
        return next((s for s in self._samples if s[0] >= moment), self._samples[-1])

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sample()
