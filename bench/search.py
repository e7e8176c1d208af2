"""Search on a big table: ``GET /api/search`` with 1,000,000 messages, 10,000 the caller's.

Fills the tables with ``--total`` messages (1,000,000) of ``--owners`` users (100), the
caller's ``--mine`` (10,000) among them, in conversations of ``--per-conversation``
messages (100) that alternate user and reply, through SQL after Parley's migrations. The
text is made up, the same every run (seeded): sentences of words drawn from a vocabulary
of 8,000 with a Zipf frequency (a word's weight is one over its rank: "the" is one word
in ten, most words are rare), some with accents (café, naïve, résumé ...), and a few
words that every other user writes often and the caller seldom. The search index is
built as migration 0012 builds it for existing messages: its triggers are left out of the
fill and its backfill statement run once after it.

Then Parley is started on that database and ``--clients`` clients (1) send two-word
searches of the caller, ``--requests`` (500) of each kind, the kinds interleaved: two
common words, a common and a rare word, two rare words, a last word of 3 letters (a
prefix, as the search takes the last word), words that other users write often and the
caller seldom, words written with accents and typed without. Two more kinds show what
search-as-you-type sends on a pause: a last word of 1 and of 2 letters. The queries are
taken from the caller's own messages, so that most find something; how many of the
caller's messages each query matches (Parley's own search, asked for all at once) is
printed by kind, and the CPU that Parley, PostgreSQL, this process and everything else
on the machine took while the searches ran. Last, three of the caller's conversations are
deleted one at a time through the API (``DELETE /api/conversations/{id}``): on SQLite
that rewrites the whole index ('optimize', ``parley.search.purge_deleted_words``), and
the searches are timed again after it.

    .venv/bin/python bench/search.py [--database sqlite] [--database-url URL]
        [--total 1000000] [--mine 10000] [--requests 500] [--clients 1]

On PostgreSQL (the default) the bench drops and re-creates the database named in the URL
(default ``parley_bench_search`` on 127.0.0.1:5432); never point it at one you want to
keep. The issue's target: p99 under 50 ms for a two-word query, on both databases.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import random
import re
import sqlite3
import statistics
import tempfile
import time
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx2
import psutil
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from _support import cpu_seconds, fake_provider, parley, percentile, storage, summary
from parley import search
from parley.config import Settings
from parley.store import migrate_sync

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/parley_bench_search"
CALLER = "seeker"
SEED = 20261201
NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4d0b-9a51-8f1c2b7e4d10")
VOCABULARY = 8000
# Conversations that are written at the same time: their messages' ids interleave.
AT_ONCE = 100
# How much less often the caller writes the words every other user writes often.
SELDOM = 100
# A word the caller wrote in at most this many messages is rare.
RARE_MESSAGES = 30
QUERIES_PER_KIND = 20

# The most frequent words, most frequent first (ranks 1 to about 100).
_COMMON = """the to and a of you i it is that in for this can with be on your what not
have are if do so but as or at my we use how will me an just from all would like there
about one get more some which they by was make here also could then should need no when up
out want know time good any them way these other think than only first new yes thanks try
because see into where work each over really much help well sure sorry let example why
right two after still may even question"""
COMMON = _COMMON.split()
# Then these (ranks from about 100 on).
_TOPICAL = """code file error function data python list value user line answer problem
system people day year week money water food book music game project team email message
page version server database test model image text number string table query result issue
change update build run install package library script command window phone car house
city country travel trip hotel flight ticket recipe dinner lunch breakfast coffee tea wine
beer cheese bread chicken garden plant flower tree dog cat bird horse school class
teacher student exam homework essay story movie film song band concert party birthday
wedding friend family mother father brother sister child baby doctor health sleep
exercise running weight diet pain medicine job interview salary manager meeting office
company market price cost budget plan idea design color paper letter word language
english french spanish german history science math physics chemistry biology energy
weather rain snow summer winter spring autumn morning evening night weekend holiday beach
mountain river lake sea island road bike train bus airport station map address name
account password login security network internet website browser app screen keyboard
mouse laptop computer memory disk battery camera photo video sound voice light room
kitchen bedroom door wall floor chair bed shirt shoes dress gift shop store order delivery
review rating support service customer contract law rule policy report chart graph sum
average formula equation variable loop array object method argument parameter return
import module framework deploy container cloud backup permission folder directory
terminal shell branch commit merge bug feature release"""
TOPICAL = _TOPICAL.split()
# Words every other user writes often (ranks 25 to 60) and the caller seldom.
OTHERS_WORDS = ["kubernetes", "mortgage", "invoice", "football"]
OTHERS_WORDS += ["vaccine", "guitar", "crypto", "landlord"]
# Words with accents, and the rank each is given.
ACCENTED = {
    "café": 150,
    "résumé": 300,
    "naïve": 500,
    "déjà": 800,
    "fiancée": 1200,
    "jalapeño": 1600,
    "crème": 2000,
    "brûlée": 2500,
    "façade": 3000,
    "über": 3500,
    "señor": 4000,
    "piñata": 4500,
    "protégé": 5000,
    "soirée": 5500,
    "cliché": 6000,
    "doppelgänger": 6500,
    "smörgåsbord": 7000,
    "entrée": 7500,
    "zürich": 7900,
}


WORD = re.compile(r"[^\W_]+")  # the made-up text's words (letters; no marks apart)


def folded(word: str) -> str:
    """A word as both indexes compare it: without case or accents."""
    decomposed = unicodedata.normalize("NFKD", word)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def vocabulary(rng: random.Random) -> list[str]:
    """The words, most frequent first: the lists above, then made-up words to the end."""
    ranked = list(dict.fromkeys(COMMON + TOPICAL))
    for rank, word in enumerate(OTHERS_WORDS):
        ranked.insert(24 + 5 * rank, word)
    made: list[str] = []
    taken = set(ranked) | {folded(word) for word in ACCENTED}
    while len(ranked) + len(made) + len(ACCENTED) < VOCABULARY:
        word = "".join(
            rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiouy") + rng.choice(["", "", "n", "r"])
            for _ in range(rng.randint(2, 4))
        )
        if word not in taken:
            taken.add(word)
            made.append(word)
    ranked += made
    for word, rank in sorted(ACCENTED.items(), key=lambda item: item[1]):
        ranked.insert(rank - 1, word)
    return ranked


class Writer:
    """Messages made up from the vocabulary, the same ones every run."""

    def __init__(self) -> None:
        self.rng = random.Random(SEED)
        self.words = vocabulary(self.rng)
        weights = [1.0 / rank for rank in range(1, len(self.words) + 1)]
        others = set(OTHERS_WORDS)
        mine = [
            w / SELDOM if word in others else w for w, word in zip(weights, self.words, strict=True)
        ]
        self.cumulative = {
            False: list(itertools.accumulate(weights)),
            True: list(itertools.accumulate(mine)),
        }

    def message(self, role: str, mine: bool) -> str:
        rng = self.rng
        count = rng.randint(3, 30) if role == "user" else rng.randint(20, 120)
        picked = rng.choices(self.words, cum_weights=self.cumulative[mine], k=count)
        sentences = []
        start = 0
        while start < count:
            end = start + rng.randint(5, 14)
            sentence = " ".join(picked[start:end])
            sentences.append(sentence[:1].upper() + sentence[1:] + "...?!"[rng.randrange(5)])
            start = end
        return " ".join(sentences)


@dataclass
class Conversation:
    id: str
    owner: str
    created_at: datetime


@dataclass
class Filled:
    conversations: list[Conversation]
    mine: list[str]  # the caller's messages' text
    words: list[str]  # the vocabulary, most frequent first


def layout(total: int, mine: int, per: int, owners: int) -> list[Conversation]:
    """The conversations, in the order they are written, the caller's spread among them."""
    if total % per or mine % per or mine >= total:
        raise SystemExit("--total and --mine must be multiples of --per-conversation")
    count = total // per
    names = [CALLER] * (mine // per) + [
        f"user-{n % (owners - 1) + 1}" for n in range(count - mine // per)
    ]
    random.Random(SEED).shuffle(names)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        Conversation(str(uuid.uuid5(NAMESPACE, f"c-{n}")), name, start + timedelta(seconds=n))
        for n, name in enumerate(names)
    ]


def messages(
    conversations: list[Conversation], per: int, writer: Writer, mine: list[str]
) -> Iterator[tuple[str, str, str, str, datetime]]:
    """(conversation, turn, role, text, time) of every message, in the order written:
    ``AT_ONCE`` conversations at a time, a message of each in turn."""
    moment = conversations[0].created_at
    for group in range(0, len(conversations), AT_ONCE):
        chats = conversations[group : group + AT_ONCE]
        for index in range(per):
            role = "user" if index % 2 == 0 else "assistant"
            for chat in chats:
                text = writer.message(role, chat.owner == CALLER)
                if chat.owner == CALLER:
                    mine.append(text)
                moment += timedelta(milliseconds=500)
                turn = f"turn-{chat.id}-{index // 2}"
                yield chat.id, turn, role, text, moment


def _backfill(dialect: str) -> str:
    """Migration 0012's statement that indexes the messages already there."""
    migration = importlib.import_module("parley.migrations.versions.0012_search")
    statements = migration._POSTGRES if dialect == "postgresql" else migration._SQLITE
    (backfill,) = [s for s in statements if s.startswith("INSERT") and " FROM messages " in s]
    return backfill


def fill_postgres(settings: Settings, conversations: list[Conversation], rows: Iterator) -> None:
    engine = sa.create_engine(settings.store_database_url(sync=True))
    raw = engine.raw_connection()
    conn = raw.driver_connection
    with conn.cursor() as cur:
        # The index's triggers (user triggers; the foreign keys' stay) wait for the end.
        cur.execute("ALTER TABLE messages DISABLE TRIGGER USER")
        columns = "id, owner, title, created_at, updated_at"
        with cur.copy(f"COPY conversations ({columns}) FROM STDIN") as copy:
            for chat in conversations:
                copy.write_row((chat.id, chat.owner, "Chat", chat.created_at, chat.created_at))
        columns = "conversation_id, turn_id, role, content, status, created_at"
        with cur.copy(f"COPY messages ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row((*row[:4], "complete", row[4]))
        cur.execute(_backfill("postgresql"))
        cur.execute("ALTER TABLE messages ENABLE TRIGGER USER")
    conn.commit()
    # This machine's PostgreSQL runs with autovacuum off: statistics, the visibility map
    # and the GIN index's pending list are what autovacuum would leave.
    conn.autocommit = True
    conn.execute("VACUUM ANALYZE")
    raw.close()
    engine.dispose()


def fill_sqlite(settings: Settings, conversations: list[Conversation], rows: Iterator) -> None:
    conn = sqlite3.connect(settings.data_dir / "parley.sqlite", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")  # this connection only
    conn.execute("BEGIN")
    triggers = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'messages'"
        " AND name LIKE 'message_search_%'"
    ).fetchall()
    for name, _ in triggers:
        conn.execute(f"DROP TRIGGER {name}")
    conn.executemany(
        "INSERT INTO conversations (id, owner, title, created_at, updated_at)"
        " VALUES (?, ?, 'Chat', ?, ?)",
        (
            (c.id, c.owner, _sqlite_time(c.created_at), _sqlite_time(c.created_at))
            for c in conversations
        ),
    )
    conn.executemany(
        "INSERT INTO messages (conversation_id, turn_id, role, content, status, created_at)"
        " VALUES (?, ?, ?, ?, 'complete', ?)",
        ((*row[:4], _sqlite_time(row[4])) for row in rows),
    )
    conn.execute(_backfill("sqlite"))
    for _, sql in triggers:
        conn.execute(sql)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _sqlite_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")  # as SQLAlchemy stores it


def fill(settings: Settings, args: argparse.Namespace) -> Filled:
    migrate_sync(settings)
    started = time.perf_counter()
    writer = Writer()
    conversations = layout(args.total, args.mine, args.per_conversation, args.owners)
    mine: list[str] = []
    rows = messages(conversations, args.per_conversation, writer, mine)
    (fill_postgres if settings.uses_postgres else fill_sqlite)(settings, conversations, rows)
    took = time.perf_counter() - started
    engine = sa.create_engine(settings.store_database_url(sync=True))
    with engine.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM messages")).scalar_one()
        indexed = conn.execute(sa.text("SELECT count(*) FROM message_search")).scalar_one()
        if settings.uses_postgres:
            sizes = conn.execute(
                sa.text(
                    "SELECT pg_database_size(current_database()),"
                    " pg_total_relation_size('messages'),"
                    " pg_total_relation_size('message_search'),"
                    " pg_relation_size('ix_message_search')"
                )
            ).one()
            size = (
                f"database {sizes[0] / 2**20:,.0f} MiB (messages {sizes[1] / 2**20:,.0f} MiB,"
                f" message_search {sizes[2] / 2**20:,.0f} MiB, its GIN index"
                f" {sizes[3] / 2**20:,.0f} MiB)"
            )
        else:
            index = conn.execute(
                sa.text("SELECT sum(length(block)) FROM message_search_data")
            ).scalar_one()
            database = (settings.data_dir / "parley.sqlite").stat().st_size
            size = f"database {database / 2**20:,.0f} MiB (the FTS5 index {index / 2**20:,.0f} MiB)"
    engine.dispose()
    words = sum(len(text.split()) for text in mine) / len(mine)
    print(
        f"filled {count:,} messages ({indexed:,} indexed) of {args.owners} users in"
        f" {len(conversations):,} conversations in {took:.0f} s; {size};"
        f" the caller's {len(mine):,} messages: {words:.0f} words on average"
    )
    return Filled(conversations, mine, writer.words)


@dataclass
class Kind:
    label: str
    queries: list[str]
    matches: list[int] = field(default_factory=list)  # the caller's messages each finds
    times: list[float] = field(default_factory=list)
    page: list[int] = field(default_factory=list)  # results on the first page


def kinds(filled: Filled) -> list[Kind]:
    """The queries, taken from the caller's messages, the same every run."""
    rng = random.Random(SEED + 1)
    rank = {folded(word): n for n, word in enumerate(filled.words)}
    others = set(OTHERS_WORDS)
    texts = [[folded(w) for w in WORD.findall(t)] for t in filled.mine]
    seen = Counter(word for text in texts for word in set(text))
    common = [w for w in filled.words[:40] if w not in others]

    def is_rare(word: str) -> bool:
        return seen[word] <= RARE_MESSAGES and word not in others

    def each(make: Callable[[list[str]], str | None]) -> list[str]:
        found: list[str] = []
        while len(found) < QUERIES_PER_KIND:
            query = make(rng.choice(texts))
            if query and query not in found:
                found.append(query)
        return found

    def either_way(one: str, other: str) -> str | None:
        """The two words in either order, but a last word of 3 letters or more: shorter
        ones, as prefixes, are the "as typed" kinds."""
        pair = [one, other] if rng.random() < 0.5 else [other, one]
        if len(pair[1]) < 3:
            pair.reverse()
        return " ".join(pair) if len(pair[1]) >= 3 else None

    def two_common(_: list[str]) -> str | None:
        first, last = rng.sample(common[:30], 2)
        return f"{first} {last}" if len(last) >= 3 else None  # not a 1 or 2 letter prefix

    def common_and_rare(text: list[str]) -> str | None:
        rare = [w for w in text if is_rare(w)]
        usual = [w for w in text if rank[w] < 40 and w not in others]
        if not rare or not usual:
            return None
        return either_way(rng.choice(usual), rng.choice(rare))

    def two_rare(text: list[str]) -> str | None:
        rare = list(dict.fromkeys(w for w in text if is_rare(w)))
        return " ".join(rng.sample(rare, 2)) if len(rare) >= 2 else None

    def prefix(letters: int) -> Callable[[list[str]], str | None]:
        def make(text: list[str]) -> str | None:
            long = [w for w in text if len(w) > letters + 1]
            if not long:
                return None
            first = rng.choice(text)
            return f"{first} {rng.choice(long)[:letters]}"

        return make

    def others_often(text: list[str]) -> str | None:
        # Half two of them (the caller has few messages with both), half with a common word.
        word = rng.choice(OTHERS_WORDS)
        if rng.random() < 0.5:
            return f"{word} {rng.choice([w for w in OTHERS_WORDS if w != word])}"
        return either_way(rng.choice(common), word)

    accented = {folded(w) for w in ACCENTED}

    def unaccented(text: list[str]) -> str | None:
        have = [w for w in text if w in accented]
        if not have:
            return None
        return either_way(rng.choice(have), rng.choice(text))

    return [
        Kind("two common words", each(two_common)),
        Kind("a common and a rare word", each(common_and_rare)),
        Kind("two rare words", each(two_rare)),
        Kind("last word 3 letters", each(prefix(3))),
        Kind("others' frequent words", each(others_often)),
        Kind("accents typed without", each(unaccented)),
        Kind("as typed: last word 2 letters", each(prefix(2))),
        Kind("as typed: last word 1 letter", each(prefix(1))),
    ]


async def count_matches(settings: Settings, all_kinds: list[Kind]) -> None:
    """How many of the caller's messages each query matches: Parley's own search, asked
    for every match at once."""
    engine = create_async_engine(settings.store_database_url())
    for kind in all_kinds:
        for query in kind.queries:
            hits = await search.search(engine, CALLER, query, limit=10**7, offset=0)
            kind.matches.append(len(hits))
    await engine.dispose()


async def timed(url: str, all_kinds: list[Kind], requests: int, clients: int) -> None:
    """``requests`` searches of each kind, the kinds interleaved, from ``clients`` at once."""
    headers = {"X-Parley-User": CALLER}
    async with httpx2.AsyncClient(base_url=url, headers=headers, timeout=120) as http:

        async def ask(query: str) -> tuple[float, int]:
            started = time.perf_counter()
            response = await http.get("/api/search", params={"q": query})
            response.raise_for_status()
            return time.perf_counter() - started, len(response.json()["results"])

        for kind in all_kinds:  # warm-up: every query once
            for query in kind.queries:
                await ask(query)
        plan = [
            (kind, kind.queries[n % len(kind.queries)])
            for n in range(requests)
            for kind in all_kinds
        ]

        async def client(share: list[tuple[Kind, str]]) -> None:
            for kind, query in share:
                took, results = await ask(query)
                kind.times.append(took)
                kind.page.append(results)

        await asyncio.gather(*(client(plan[n::clients]) for n in range(clients)))


def report(all_kinds: list[Kind], with_matches: bool = True) -> None:
    for kind in all_kinds:
        line = f"  {kind.label:31} {summary(kind.times)}   max {max(kind.times) * 1000:7.1f} ms"
        if with_matches:
            matches = sorted(kind.matches)
            line += (
                f"   matches min {matches[0]:,} median {int(statistics.median(matches)):,}"
                f" max {matches[-1]:,}; first page {statistics.mean(kind.page):.1f}"
            )
        print(line)
    asked = [k for k in all_kinds if not k.label.startswith("as typed")]
    for label, chosen in (("two-word queries (first six)", asked), ("all", all_kinds)):
        times = [t for kind in chosen for t in kind.times]
        top = max(times) * 1000
        print(
            f"  {label:31} {summary(times)}   max {top:7.1f} ms"
            f"   ({len(times):,} requests; p99.9 {percentile(times, 0.999) * 1000:.1f} ms)"
        )


def cpu_split(parley_pid: int) -> dict[str, float]:
    """CPU seconds so far: the machine's, Parley's, PostgreSQL's and this process's."""
    machine = psutil.cpu_times()
    postgres = 0.0
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "postgres":
            with contextlib.suppress(psutil.Error):
                postgres += cpu_seconds(process)
    return {
        "busy": sum(machine) - machine.idle - machine.iowait,
        "at": time.monotonic(),
        "Parley": cpu_seconds(psutil.Process(parley_pid)),
        "PostgreSQL": postgres,
        "this process": cpu_seconds(psutil.Process()),
    }


def cpu_shares(before: dict[str, float], after: dict[str, float]) -> str:
    """What each part took of the machine between two ``cpu_split``s, and the rest (other
    processes: on a shared machine, what may have slowed the searches)."""
    span = after["at"] - before["at"]
    used = {key: (after[key] - before[key]) / span * 100 for key in after if key != "at"}
    used["other processes"] = used["busy"] - used["Parley"] - used["PostgreSQL"]
    used["other processes"] -= used["this process"]
    return ", ".join(f"{key} {value:.0f}%" for key, value in used.items())


async def delete_some(url: str, conversation_ids: list[str]) -> list[float]:
    headers = {"X-Parley-User": CALLER}
    took = []
    async with httpx2.AsyncClient(base_url=url, headers=headers, timeout=600) as http:
        for conversation_id in conversation_ids:
            started = time.perf_counter()
            response = await http.delete(f"/api/conversations/{conversation_id}")
            response.raise_for_status()
            took.append(time.perf_counter() - started)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument(
        "--database-url",
        help=f"PostgreSQL URL (default {DEFAULT_URL}); the bench drops and re-creates it",
    )
    parser.add_argument("--total", type=int, default=1_000_000)
    parser.add_argument("--mine", type=int, default=10_000)
    parser.add_argument("--owners", type=int, default=100)
    parser.add_argument("--per-conversation", type=int, default=100)
    parser.add_argument("--requests", type=int, default=500, help="of each kind")
    parser.add_argument("--clients", type=int, default=1)
    args = parser.parse_args()
    database_url = None
    if args.database == "postgresql":
        database_url = args.database_url or DEFAULT_URL

    with tempfile.TemporaryDirectory() as data_dir:
        env, storage_name = storage(database_url)
        settings = Settings(data_dir=Path(data_dir), database_url=database_url)
        print(f"storage: {storage_name}; {args.clients} clients")
        filled = fill(settings, args)
        all_kinds = kinds(filled)
        asyncio.run(count_matches(settings, all_kinds))
        with (
            fake_provider() as base_url,
            parley(Path(data_dir), OPENAI_BASE_URL=base_url, **env) as (url, pid),
        ):
            before = cpu_split(pid)
            asyncio.run(timed(url, all_kinds, args.requests, args.clients))
            shares = cpu_shares(before, cpu_split(pid))
            print(f"searches ({args.requests} of each kind; matches: the caller's messages)")
            print(f"  CPU meanwhile, of {100 * psutil.cpu_count()}%: {shares}")
            report(all_kinds)
            for kind in all_kinds:
                print(f"    {kind.label}: {', '.join(repr(q) for q in kind.queries[:4])} ...")
            mine = [c.id for c in filled.conversations if c.owner == CALLER]
            took = asyncio.run(delete_some(url, mine[:3]))
            print(
                f"deleting one of the caller's conversations ({args.per_conversation} messages)"
                f" through the API: {', '.join(f'{t:.2f} s' for t in took)}"
            )
            if not settings.uses_postgres:
                again = [Kind(k.label, k.queries) for k in all_kinds]
                asyncio.run(timed(url, again, max(1, args.requests // 5), args.clients))
                print("searches again, after the deletions merged the index into one segment")
                report(again, with_matches=False)


if __name__ == "__main__":
    main()
