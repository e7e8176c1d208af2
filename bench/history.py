"""History reads on a big table: the first page of a conversation and the example's /history.

Fills the messages table with ``--total`` messages (1,000,000 by default) in conversations
of ``--per-conversation`` messages (10,000), straight through SQL, then starts Parley on
that database and times, from ``--clients`` clients at once, ``GET
/api/conversations/{id}/messages`` (the first page, 50 messages) and ``GET
/history/{username}`` (every message of the conversation) of one of those conversations.

    .venv/bin/python bench/history.py [--database-url URL] [--requests 500] [--clients 1]

On PostgreSQL the bench drops and re-creates the database named in the URL (default
``parley_bench_history`` on 127.0.0.1:5432); never point it at one you want to keep. The
issue's target: under 20 ms p99 for both.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx2
import sqlalchemy as sa

from _support import add_database_argument, fake_provider, parley, storage, summary
from parley.config import Settings
from parley.store import migrate_sync, seed_conversation_id

READER = "reader"
CONTENT = "A message of about two hundred characters, as a chat reply often is. " * 3

# Conversations "c-1" .. "c-N" of ``per`` messages each, alternating user and reply, made
# by the database itself; the last one is the reader's.
POSTGRES_FILL = """
INSERT INTO conversations (id, owner, title, created_at, updated_at)
SELECT CASE n WHEN :count THEN :reader ELSE 'c-' || n END,
    CASE n WHEN :count THEN :owner ELSE 'user-' || n END, 'bench', now(), now()
FROM generate_series(1, :count) AS n;
INSERT INTO messages (conversation_id, turn_id, role, content, status, created_at)
SELECT CASE 1 + (i / :per) WHEN :count THEN :reader ELSE 'c-' || (1 + (i / :per)) END,
    'turn-' || (i / 2), CASE i % 2 WHEN 0 THEN 'user' ELSE
    'assistant' END, :content, 'complete', now()
FROM generate_series(0, :total - 1) AS i;
"""

SQLITE_FILL = """
WITH RECURSIVE n(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM n WHERE v < :count)
INSERT INTO conversations (id, owner, title, created_at, updated_at)
SELECT CASE v WHEN :count THEN :reader ELSE 'c-' || v END,
    CASE v WHEN :count THEN :owner ELSE 'user-' || v END, 'bench', datetime('now'), datetime('now')
FROM n;
WITH RECURSIVE i(v) AS (SELECT 0 UNION ALL SELECT v + 1 FROM i WHERE v < :total - 1)
INSERT INTO messages (conversation_id, turn_id, role, content, status, created_at)
SELECT CASE 1 + (v / :per) WHEN :count THEN :reader ELSE 'c-' || (1 + (v / :per)) END,
    'turn-' || (v / 2), CASE v % 2 WHEN 0 THEN 'user' ELSE
    'assistant' END, :content, 'complete', datetime('now')
FROM i;
"""


def fill(settings: Settings, total: int, per: int) -> str:
    """Create and fill the tables; the id of the reader's conversation."""
    migrate_sync(settings)
    count = total // per
    engine = sa.create_engine(settings.store_database_url(sync=True))
    script = POSTGRES_FILL if settings.uses_postgres else SQLITE_FILL
    # The reader's conversation is the last one, under the id /history derives.
    reader = seed_conversation_id(READER)
    values = {"count": count, "per": per, "total": total, "content": CONTENT}
    values |= {"reader": reader, "owner": READER}
    started = time.perf_counter()
    with engine.begin() as conn:
        for statement in filter(str.strip, script.split(";")):
            conn.execute(sa.text(statement), values)
    # Committed: ANALYZE's statistics are transactional, and a plan made without them
    # sorts the conversation instead of reading it in index order (8 ms against 4 ms on
    # PostgreSQL). A real server's autovacuum gathers them by itself; these machines'
    # PostgreSQL runs with autovacuum off.
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
        rows = conn.execute(sa.text("SELECT count(*) FROM messages")).scalar_one()
    engine.dispose()
    took = time.perf_counter() - started
    print(f"filled {rows:,} messages in {count:,} conversations in {took:.0f} s")
    return reader


async def timed(url: str, path: str, requests: int, clients: int) -> list[float]:
    headers = {"X-Parley-User": READER}
    async with httpx2.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        (await http.get(path)).raise_for_status()  # warm-up
        times: list[float] = []

        async def client() -> None:
            for _ in range(requests // clients):
                started = time.perf_counter()
                response = await http.get(path)
                response.raise_for_status()
                times.append(time.perf_counter() - started)

        await asyncio.gather(*(client() for _ in range(clients)))
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_database_argument(parser)
    parser.add_argument("--total", type=int, default=1_000_000)
    parser.add_argument("--per-conversation", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as data_dir:
        env, storage_name = storage(args.database_url)
        settings = Settings(data_dir=Path(data_dir), database_url=args.database_url)
        conversation = fill(settings, args.total, args.per_conversation)
        print(f"storage: {storage_name}; {args.clients} clients")
        with (
            fake_provider() as base_url,
            parley(Path(data_dir), OPENAI_BASE_URL=base_url, **env) as (url, _),
        ):
            for label, path in (
                ("first page (50 messages)", f"/api/conversations/{conversation}/messages"),
                (f"/history ({args.per_conversation:,} messages)", f"/history/{READER}"),
            ):
                times = asyncio.run(timed(url, path, args.requests, args.clients))
                print(f"  {label:32} {summary(times)}")


if __name__ == "__main__":
    main()
