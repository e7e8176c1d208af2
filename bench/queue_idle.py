"""What an idle Parley costs with the provider's limits set: the queue is looked at every
``PARLEY_LLM_QUEUE_POLL_SECONDS`` whether or not a turn waits.

For each configuration (no limits, then ``PARLEY_LLM_CONCURRENCY=4`` with each interval in
``--polls``), a fresh Parley is started, left alone for 5 s, and its CPU read over
``--seconds`` of doing nothing; the configurations alternate for ``--rounds`` rounds.

    .venv/bin/python bench/queue_idle.py [--polls 0.1,0.25,1.0] [--seconds 20] [--rounds 2]
                                         [--database-url URL]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import psutil

from _support import add_database_argument, cpu_seconds, fake_provider, parley, storage


def idle_cpu(env: dict[str, str], seconds: float) -> float:
    """Milliseconds of CPU a second, of a fresh Parley left alone."""
    with tempfile.TemporaryDirectory() as data, parley(Path(data), **env) as (_url, pid):
        process = psutil.Process(pid)
        time.sleep(5)
        before = cpu_seconds(process)
        time.sleep(seconds)
        return (cpu_seconds(process) - before) / seconds * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", default="0.1,0.25,1.0")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    add_database_argument(parser)
    args = parser.parse_args()
    configs: list[tuple[str, dict[str, str]]] = [("no limits", {})]
    for poll in args.polls.split(","):
        limits = {"PARLEY_LLM_CONCURRENCY": "4", "PARLEY_LLM_QUEUE_POLL_SECONDS": poll}
        configs.append((f"limits, poll {poll} s", limits))
    with fake_provider() as base_url:
        for _ in range(args.rounds):
            for label, extra in configs:
                env, where = storage(args.database_url)
                cpu = idle_cpu({**env, "OPENAI_BASE_URL": base_url, **extra}, args.seconds)
                print(f"{where:10} {label:22} idle CPU {cpu:5.1f} ms/s", flush=True)


if __name__ == "__main__":
    main()
