"""CPU time against wall-clock time, over a sliding window: the figures on the page.

CPU time is a process's user + system time from psutil: its reading now less the reading
sampled, once a second, at the window's start. Parley's own process and the embedded
model's process (when one runs) are measured apart. The wall-clock figure is the summed
duration of the chat turns that finished in the window.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_time: float
    model_cpu_time: float | None
    wall_clock_time: float
    turns: int
    window_seconds: float


class UsageMeter:
    def __init__(self, window: float = 60.0, interval: float = 1.0) -> None:
        self.window = window
        self.interval = interval
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
        # Keep one sample at or before the window's start, to measure from it.
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def record_turn(self, seconds: float) -> None:
        self._turns.append((time.monotonic(), seconds))

    def snapshot(self) -> Usage:
        now = time.monotonic()
        while self._turns and self._turns[0][0] < now - self.window:
            self._turns.popleft()
        _, own_start, model_start = next(
            (s for s in self._samples if s[0] >= now - self.window), self._samples[-1]
        )
        return Usage(
            cpu_time=max(0.0, self._own_cpu() - own_start),
            model_cpu_time=(
                max(0.0, self._model_cpu() - model_start) if self.model_cpu is not None else None
            ),
            wall_clock_time=sum(seconds for _, seconds in self._turns),
            turns=len(self._turns),
            window_seconds=self.window,
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sample()
