"""A burst of turns against a provider with limits: Parley told them, and not told them.

The provider is the tests' fake one, keeping limits as a real one does (``--concurrency``
requests in flight and ``--per-minute`` a minute, 429 with Retry-After above them), with a
``--latency`` second model. ``--users`` users each send ``--per-user`` messages at once,
each in a conversation of its own, and read their replies' streams. Two runs, side by
side, each on a fresh Parley and a fresh provider:

- **queue**: Parley is told the limits (``PARLEY_LLM_CONCURRENCY``,
  ``PARLEY_LLM_REQUESTS_PER_MINUTE``), so turns wait in its queue;
- **no queue**: Parley is not told, and learns them from the provider's 429s.

For each: how long the burst took against the least time the limits allow, the requests
the provider saw and how many it refused (429), turns that failed, and each user's wait
(from sending a message to its first piece) at the median and the worst, taken over the
users' median waits and over every turn.

    .venv/bin/python bench/provider_limits.py [--users 30] [--per-user 10] [--concurrency 4]
                                             [--per-minute 120] [--latency 1.0]
                                             [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from _support import ROOT, add_database_argument, parley, storage

# The burst and the fake provider are the tests' own (``tests/test_pacing.py``).
sys.path.insert(0, str(ROOT))
from tests.fake_provider import FakeProvider, Limits
from tests.test_pacing import _burst_async, fastest_possible


def run(args: argparse.Namespace, told: bool) -> None:
    env, where = storage(args.database_url)
    fake = FakeProvider(latency=args.latency).start()
    fake.limits = Limits(concurrency=args.concurrency, per_minute=args.per_minute)
    env |= {"OPENAI_BASE_URL": fake.base_url}
    if told:
        env |= {
            "PARLEY_LLM_CONCURRENCY": str(args.concurrency),
            "PARLEY_LLM_REQUESTS_PER_MINUTE": str(args.per_minute),
        }
    try:
        with tempfile.TemporaryDirectory() as data, parley(Path(data), **env) as (url, _pid):
            outcomes, took = asyncio.run(_burst_async(url, args.users, args.per_user))
    finally:
        fake.stop()
    turns = args.users * args.per_user
    least = fastest_possible(turns, fake.limits, args.latency)
    failed = sum(1 for o in outcomes if not o.events or o.events[-1] != "done")
    waits = [o.first_token - o.sent for o in outcomes if o.first_token]
    by_user: dict[str, list[float]] = {}
    for outcome in outcomes:
        if outcome.first_token:
            by_user.setdefault(outcome.user, []).append(outcome.first_token - outcome.sent)
    user_medians = [statistics.median(w) for w in by_user.values()]
    name = "queue" if told else "no queue"
    print(
        f"{name:9} {where:10} took {took:6.1f} s (least {least:6.1f} s, x{took / least:4.2f})"
        f"   calls {len(fake.calls):4}   429s {fake.limits.refused:4}   failed {failed:3}"
        f"   wait p50 {statistics.median(waits):5.1f} s  max {max(waits):5.1f} s"
        f"   users' median wait p50 {statistics.median(user_medians):5.1f} s"
        f"  max {max(user_medians):5.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--per-user", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--per-minute", type=int, default=120)
    parser.add_argument("--latency", type=float, default=1.0)
    add_database_argument(parser)
    args = parser.parse_args()
    print(
        f"{args.users} users x {args.per_user} messages; provider: {args.concurrency} in "
        f"flight, {args.per_minute} a minute, {args.latency} s a reply"
    )
    for told in (True, False):
        run(args, told)


if __name__ == "__main__":
    main()
