"""Accounts mode at the edges: sign-in and sign-up limits, the first admin and closed
sign-up under many requests at once, Argon2 bounded, and names that only look alike.

Every decision here is taken in the database, so the counts are exact however many
requests come at once, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import threading
import time
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa
from alembic import command
from argon2 import PasswordHasher
from sqlalchemy.ext.asyncio import create_async_engine

from parley import limits
from parley.config import Settings
from parley.store import _sqlite_pragmas, alembic_config, ensure_postgres_database
from tests.conftest import BACKENDS, QUICK_RETRIES, ParleyServer, unique
from tests.fake_provider import FakeProvider

PASSWORD = "correct horse battery"
WRONG = "not the password"


def at_once(count: int, call: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    """``call(0)`` .. ``call(count - 1)``, each in a thread of its own, released together."""
    start = threading.Barrier(count)

    def run(index: int) -> httpx.Response:
        start.wait()
        return call(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def statuses(responses: list[httpx.Response]) -> Counter[int]:
    return Counter(response.status_code for response in responses)


def post(server: ParleyServer, path: str, name: str, password: str) -> httpx.Response:
    with server.client(timeout=120) as http:
        return http.post(path, json={"username": name, "password": password})


def sign_up(server: ParleyServer, name: str, password: str = PASSWORD) -> httpx.Response:
    return post(server, "/api/auth/signup", name, password)


def sign_in(server: ParleyServer, name: str, password: str = PASSWORD) -> httpx.Response:
    return post(server, "/api/auth/login", name, password)


def accounts(
    make_server: Callable[..., ParleyServer], database_url: str | None, **env: str
) -> ParleyServer:
    return make_server(database_url, PARLEY_AUTH="accounts", **env).start()


def users_of(server: ParleyServer, admin: str) -> list[dict[str, object]]:
    with server.client() as http:
        assert http.post(
            "/api/auth/login", json={"username": admin, "password": PASSWORD}
        ).is_success
        listed = http.get("/api/admin/users")
    assert listed.status_code == 200, listed.text
    return listed.json()  # type: ignore[no-any-return]


# --- The limiter itself ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_take_counts_exactly_in_a_fixed_window(
    database_url: str | None, tmp_path: Path
) -> None:
    if database_url is None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'limits.sqlite'}")
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        await ensure_postgres_database(database_url)
        engine = create_async_engine(
            sa.make_url(database_url).set(drivername="postgresql+asyncpg"), pool_size=20
        )
    async with engine.begin() as conn:
        await conn.run_sync(limits.rate_limits.create)

    async def count(key: str) -> int | None:
        async with engine.connect() as conn:
            table = limits.rate_limits
            return await conn.scalar(sa.select(table.c.count).where(table.c.key == key))

    async def take(key: str, now: datetime | None = None) -> float | None:
        """None if counted, else the seconds to wait."""
        try:
            async with engine.begin() as conn:
                await limits.take(conn, key, 10, 60, now)
        except limits.Limited as limited:
            return limited.retry_after
        return None

    # 60 at once, on as many connections as the pool gives: exactly 10 are counted.
    waits = await asyncio.gather(*(take("k") for _ in range(60)))
    assert waits.count(None) == 10
    assert all(0 < wait <= 60 for wait in waits if wait is not None)
    assert await count("k") == 10
    # Given back, the places are taken again, and no more.
    async with engine.begin() as conn:
        await limits.give_back(conn, "k")
        await limits.give_back(conn, "k")
    assert [await take("k") is None for _ in range(3)] == [True, True, False]
    # A count in a transaction that rolls back is undone.
    with pytest.raises(RuntimeError):
        async with engine.begin() as conn:
            await limits.take(conn, "other", 10, 60)
            raise RuntimeError
    assert await count("other") is None
    # Once the window has passed, a new one starts at the first event.
    assert await take("k", datetime.now(UTC) + timedelta(seconds=61)) is None
    assert await count("k") == 1
    # Never below zero.
    async with engine.begin() as conn:
        for _ in range(3):
            await limits.give_back(conn, "k")
    assert await count("k") == 0
    # Rows untouched for a day go.
    assert await take("stale", datetime.now(UTC) - timedelta(days=2)) is None
    assert await limits.prune(engine) == 1
    assert await count("stale") is None
    assert await count("k") == 0
    await engine.dispose()


# --- Failed sign-ins ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_wrong_passwords_stop_at_the_accounts_limit(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    server = accounts(make_server, database_url, PARLEY_SIGN_IN_FAILURES_PER_ACCOUNT="10")
    carol = unique("carol")
    assert sign_up(server, carol).status_code == 201

    tried = at_once(60, lambda _: sign_in(server, carol, WRONG))
    assert statuses(tried) == {401: 10, 429: 50}
    assert all(int(r.headers["retry-after"]) > 0 for r in tried if r.status_code == 429)
    # The window is spent: even the right password waits, in any spelling of the name.
    for name in (carol, carol.upper()):
        locked = sign_in(server, name)
        assert locked.status_code == 429
        assert 0 < int(locked.headers["retry-after"]) <= 300
    # Someone else's account, from the same address, is not locked.
    dave = unique("dave")
    assert sign_up(server, dave).status_code == 201
    assert sign_in(server, dave).status_code == 200


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_wrong_passwords_stop_at_the_addresss_limit(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    server = accounts(
        make_server,
        database_url,
        PARLEY_SIGN_IN_FAILURES_PER_ADDRESS="30",
        PARLEY_PASSWORD_HASH_QUEUE="100",  # every attempt let through may wait to be hashed
    )
    erin = unique("erin")
    assert sign_up(server, erin).status_code == 201
    # Signing in successfully counts nothing against the address.
    for _ in range(3):
        assert sign_in(server, erin).status_code == 200

    tried = at_once(90, lambda i: sign_in(server, f"nobody-{i}", WRONG))
    assert statuses(tried) == {401: 30, 429: 60}
    assert sign_in(server, erin).status_code == 429


# --- Sign-up ----------------------------------------------------------------------------


def store_engine(server: ParleyServer) -> sa.Engine:
    """A synchronous engine on the server's own tables."""
    settings = Settings(
        _env_file=None, data_dir=server.data_dir, DATABASE_URL=server.env.get("DATABASE_URL")
    )
    return sa.create_engine(settings.store_database_url(sync=True), poolclass=sa.NullPool)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_sign_ups_on_a_fresh_install_make_one_admin(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    server = accounts(make_server, database_url, PARLEY_SIGNUPS_PER_ADDRESS="1000")
    engine = store_engine(server)
    # A race lost only now and then shows in one of a few rounds: each starts from no
    # accounts at all.
    for _ in range(4):
        names = [unique("first") for _ in range(16)]
        made = at_once(len(names), lambda i, names=names: sign_up(server, names[i]))
        assert statuses(made) == {201: 16}
        admins = [r.json()["username"] for r in made if r.json()["is_admin"]]
        assert len(admins) == 1
        listed = users_of(server, admins[0])
        assert sorted(u["username"] for u in listed) == sorted(names)
        assert [u["username"] for u in listed if u["is_admin"]] == admins
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM sessions"))
            conn.execute(sa.text("DELETE FROM users"))
    engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_sign_up_stays_closed_under_parallel_sign_ups(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    server = accounts(make_server, database_url, PARLEY_SIGNUP="false")
    # The first account always may be made, and only the first.
    names = [unique(f"early{i}") for i in range(10)]
    first = at_once(10, lambda i: sign_up(server, names[i]))
    assert statuses(first) == {201: 1, 403: 9}
    admin = next(r.json()["username"] for r in first if r.status_code == 201)

    later = at_once(10, lambda _: sign_up(server, unique("late")))
    assert statuses(later) == {403: 10}
    assert [u["username"] for u in users_of(server, admin)] == [admin]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sign_up_closed_by_the_admin_while_sign_ups_run(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    """Whether sign-up is open is decided with the insert: no account is made after the
    admin's closing has answered, though the sign-ups began before it."""
    server = accounts(make_server, database_url, PARLEY_SIGNUPS_PER_ADDRESS="1000")
    admin = unique("admin")
    first_made = threading.Event()

    def racing(name: str) -> httpx.Response:
        response = sign_up(server, name)
        if response.status_code == 201:
            first_made.set()
        return response

    with server.client() as http, ThreadPoolExecutor(1) as closer:
        assert http.post("/api/auth/signup", json={"username": admin, "password": PASSWORD}).json()[
            "is_admin"
        ]

        def close() -> datetime:
            # Once the first sign-up is made, while the others wait for their passwords
            # to be hashed.
            assert first_made.wait(60)
            closed = http.put(
                "/api/admin/signup",
                json={"signup": False},
                headers={"X-CSRF-Token": http.cookies["parley_csrf"]},
            )
            assert closed.status_code == 200
            return datetime.now(UTC)

        closing = closer.submit(close)
        names = [unique("racing") for _ in range(30)]
        made = at_once(len(names), lambda i: racing(names[i]))
        closed_at = closing.result()
    assert set(statuses(made)) == {201, 403}, statuses(made)
    engine = store_engine(server)
    with engine.connect() as conn:
        created = conn.execute(sa.text("SELECT username, created_at FROM users")).all()
    engine.dispose()
    assert len(created) == 1 + statuses(made)[201]
    late = [name for name, at in created if _utc(at) > closed_at]
    assert late == []

    later = at_once(10, lambda _: sign_up(server, unique("late")))
    assert statuses(later) == {403: 10}


def _utc(moment: datetime | str) -> datetime:
    if isinstance(moment, str):  # SQLite through a plain text query
        moment = datetime.fromisoformat(moment)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@pytest.mark.parametrize("backend", BACKENDS)
def test_sign_ups_per_address(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    server = accounts(make_server, database_url, PARLEY_SIGNUPS_PER_ADDRESS="5")
    names = [unique(f"many{i}") for i in range(12)]

    made = at_once(12, lambda i: sign_up(server, names[i]))
    assert statuses(made) == {201: 5, 429: 7}
    refused = [r for r in made if r.status_code == 429]
    assert all(3000 < int(r.headers["retry-after"]) <= 3600 for r in refused)
    # Refused before anything was made: a refused name is still free.
    admin = next(r.json()["username"] for r in made if r.json().get("is_admin"))
    assert len(users_of(server, admin)) == 5
    # A taken name is told as such, without spending anything.
    assert sign_up(server, admin).status_code == 409


# --- Argon2, bounded ------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


@pytest.mark.parametrize("backend", BACKENDS)
def test_hashing_beyond_the_queue_is_refused_without_hashing(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    attempts = 40
    server = accounts(
        make_server,
        database_url,
        PARLEY_PASSWORD_HASHES_AT_ONCE="1",
        PARLEY_PASSWORD_HASH_QUEUE="0",
        PARLEY_SIGN_IN_FAILURES_PER_ADDRESS=str(attempts),
    )
    hasher = PasswordHasher()
    stored = hasher.hash(PASSWORD)
    started = time.process_time()
    for _ in range(5):
        hasher.verify(stored, PASSWORD)
    hash_cpu = (time.process_time() - started) / 5

    before = _cpu_seconds(server.pid)
    tried = at_once(attempts, lambda i: sign_in(server, f"nobody-{i}", WRONG))
    spent = _cpu_seconds(server.pid) - before
    counted = statuses(tried)
    assert set(counted) == {401, 503}, counted
    busy = [r for r in tried if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 for r in busy)
    # Refused work was not done: had the refused attempts been hashed, Parley would have
    # spent a hash's CPU on each.
    assert spent < (counted[401] + counted[503] / 2) * hash_cpu, (spent, hash_cpu, counted)
    # Nor counted as failures: the address has exactly the refused ones left.
    for left in range(counted[503]):
        assert sign_in(server, f"later-{left}", WRONG).status_code == 401
    assert sign_in(server, "one-too-many", WRONG).status_code == 429


# --- Names ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def names_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    provider: FakeProvider,
) -> Iterator[ParleyServer]:
    env = {
        "OPENAI_BASE_URL": provider.base_url,
        "PARLEY_AUTH": "accounts",
        "PARLEY_SIGNUPS_PER_ADDRESS": "1000",
        **QUICK_RETRIES,
    }
    if request.param == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_databases").new_url()
    running = ParleyServer(tmp_path_factory.mktemp("parley-names"), env).start()
    yield running
    running.stop()


def test_one_account_per_unicode_spelling(names_server: ParleyServer) -> None:
    tag = unique("")
    composed = unicodedata.normalize("NFC", f"josé{tag}")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    made = sign_up(names_server, decomposed)
    assert made.status_code == 201
    assert made.json()["username"] == composed  # kept in its composed spelling
    assert sign_up(names_server, composed).status_code == 409
    assert sign_up(names_server, f"ｊｏｓé{tag}").status_code == 409  # fullwidth letters
    signed_in = sign_in(names_server, composed)
    assert signed_in.status_code == 200
    assert signed_in.json()["username"] == composed


def test_one_account_per_name_in_any_case(names_server: ParleyServer) -> None:
    carol = unique("carol")
    assert sign_up(names_server, carol).status_code == 201
    assert sign_up(names_server, carol.capitalize()).status_code == 409
    assert sign_up(names_server, carol.upper()).status_code == 409
    signed_in = sign_in(names_server, carol.capitalize())
    assert signed_in.status_code == 200
    assert signed_in.json()["username"] == carol
    assert sign_in(names_server, carol.upper(), WRONG).status_code == 401


def _refused_name(server: ParleyServer, name: str) -> str:
    """The message of the 422 that sign-up answers for ``name``, which must name the
    field."""
    response = sign_up(server, name)
    assert response.status_code == 422, (name, response.text)
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "username"], error
    return str(error["msg"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("\u3164", "invisible"),  # Hangul filler
        ("\u3164\u3164\u3164", "invisible"),
        ("\u2800", "invisible"),  # braille blank
        ("\u115f\u1160", "invisible"),
        ("a\ufe0f", "invisible"),  # a variation selector
        (" bob", "begin or end with a space"),
        ("bob ", "begin or end with a space"),
        ("bob\u00a0", "begin or end with a space"),  # NFKC makes it a space
        ("\u0440\u0430ypal", "scripts"),  # Cyrillic er and a, then Latin
        ("Ωmega", "scripts"),
        ("a/b", "'/'"),
        ("/", "'/'"),
        ("..", "'/'"),
    ],
)
def test_names_that_hide_or_pretend_are_refused(
    names_server: ParleyServer, name: str, message: str
) -> None:
    assert message in _refused_name(names_server, name)


@pytest.mark.parametrize(
    "name", ["山田たろう", "ヤマダ太郎ー", "김철수金", "Москва", "Ελληνικά", "naïve_2.0-x", "a b"]
)
def test_names_of_one_script_or_a_usual_mix_are_taken(
    names_server: ParleyServer, name: str
) -> None:
    tagged = f"{name}-{uuid.uuid4().int % 10**12}"  # digits: shared by every script
    made = sign_up(names_server, tagged)
    assert made.status_code == 201, made.text
    # With "/" refused, every name has a URL of its own.
    with names_server.client() as http:
        assert http.post(
            "/api/auth/login", json={"username": tagged, "password": PASSWORD}
        ).is_success
        assert http.get(f"/history/{tagged}").status_code == 200


def test_a_slash_is_refused_in_open_mode_too(make_server: Callable[..., ParleyServer]) -> None:
    server = make_server().start()
    with server.client() as http:
        refused = http.post("/chat", json={"message": "hi", "username": "a/b"})
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"] == ["body", "username"]
        header = http.get("/api/conversations", headers={"X-Parley-User": "a/b"})
        assert header.status_code == 422
        assert header.json()["detail"][0]["loc"] == ["header", "X-Parley-User"]


# --- Names that were already there ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_existing_names_that_collide_keep_signing_in(
    make_server: Callable[..., ParleyServer], database_url: str | None, tmp_path: Path
) -> None:
    """Accounts made before the name keys, two of which differ only in case: the
    migration keeps both, each signs in by its exact name, and the name is taken."""
    server = make_server(database_url, PARLEY_AUTH="accounts")
    settings = Settings(_env_file=None, data_dir=server.data_dir, DATABASE_URL=database_url)
    if database_url is not None:
        asyncio.run(ensure_postgres_database(database_url))
    command.upgrade(alembic_config(settings), "0006")
    hasher = PasswordHasher()
    old = [
        ("carol", "carol's password"),
        ("Carol", "Carol's password"),
        # Two scripts in one name: refused for new names, kept for this one.
        ("Иван Smith", "Ivan's password"),
    ]
    engine = sa.create_engine(settings.store_database_url(sync=True))
    with engine.begin() as conn:
        for number, (name, password) in enumerate(old):
            conn.execute(
                sa.text(
                    "INSERT INTO users (username, password_hash, is_admin, created_at, uid,"
                    " chat_conversation_id) VALUES (:name, :hash, :admin, CURRENT_TIMESTAMP,"
                    " :uid, :chat)"
                ),
                {
                    "name": name,
                    "hash": hasher.hash(password),
                    "admin": number == 0,
                    "uid": f"uid-{number}",
                    "chat": f"chat-{number}",
                },
            )
    engine.dispose()

    server.start()
    for name, password in old:
        signed_in = sign_in(server, name, password)
        assert signed_in.status_code == 200, signed_in.text
        assert signed_in.json()["username"] == name
    assert sign_in(server, "CAROL", "carol's password").json()["username"] == "carol"
    assert sign_up(server, "CaRoL").status_code == 409

    # A name from before today's rules still chats through the example's API.
    with server.client() as ivan:
        assert ivan.post(
            "/api/auth/login", json={"username": "Иван Smith", "password": "Ivan's password"}
        ).is_success
        csrf = {"X-CSRF-Token": ivan.cookies["parley_csrf"]}
        said = ivan.post("/chat", json={"message": "hi", "username": "Иван Smith"}, headers=csrf)
        assert said.status_code == 200, said.text
        history = ivan.get("/history/Иван Smith")
        assert history.status_code == 200 and len(history.json()) == 2, history.text
    # The admin removes "Carol" by her exact name, not carol, whose key she shares.
    with server.client() as admin:
        assert admin.post(
            "/api/auth/login", json={"username": "carol", "password": "carol's password"}
        ).is_success
        csrf = {"X-CSRF-Token": admin.cookies["parley_csrf"]}
        assert admin.delete("/api/admin/users/Carol", headers=csrf).status_code == 204
        names = [user["username"] for user in admin.get("/api/admin/users").json()]
    assert "carol" in names and "Carol" not in names
