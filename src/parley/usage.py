"""CPU time against wall-clock time, over a sliding window: the figures on the page.

CPU time is this process's own (user + system, from psutil): its reading now less the
reading sampled, once a second, at the window's start. The wall-clock figure is the
summed duration of the chat turns that finished in the window.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_time: float
    wall_clock_time: float
    turns: int
    window_seconds: float


class UsageMeter:
    def __init__(self, window: float = 60.0, interval: float = 1.0) -> None:
        self.window = window
        self.interval = interval
        self._process = psutil.Process()
        self._cpu_samples: deque[tuple[float, float]] = deque()
        self._turns: deque[tuple[float, float]] = deque()
        self.sample()

    def _cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    def sample(self) -> None:
        now = time.monotonic()
        self._cpu_samples.append((now, self._cpu_seconds()))
        # Keep one sample at or before the window's start, to measure from it.
        while len(self._cpu_samples) > 1 and self._cpu_samples[1][0] <= now - self.window:
            self._cpu_samples.popleft()

    def record_turn(self, seconds: float) -> None:
        self._turns.append((time.monotonic(), seconds))

    def snapshot(self) -> Usage:
        now = time.monotonic()
        while self._turns and self._turns[0][0] < now - self.window:
            self._turns.popleft()
        start = self._cpu_samples[0][1]
        for taken_at, cpu in self._cpu_samples:
            if taken_at >= now - self.window:
                start = cpu
                break
        return Usage(
            cpu_time=max(0.0, self._cpu_seconds() - start),
            wall_clock_time=sum(seconds for _, seconds in self._turns),
            turns=len(self._turns),
            window_seconds=self.window,
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sample()
