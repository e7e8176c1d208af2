"""Accounts mode: users with passwords, server-side sessions, CSRF tokens.

Passwords are hashed with Argon2 (argon2-cffi), off the event loop: a hash takes tens of
milliseconds of CPU by design, so at most a few run at once and a few more wait
(``PasswordHashing``); a request beyond that is refused at once. Whatever can refuse a
request (too many failed sign-ins, too many sign-ups from an address, a taken name, closed
sign-up) is settled in the database before any hashing, and every such decision that must
hold under concurrency is atomic there (``parley.limits``, row locks, unique indexes).

A session is a random token in an HttpOnly cookie; the database keeps only its HMAC under
the server's secret, so a copy of the database does not hold usable sessions. Signing out
or removing a user deletes the rows, which ends the sessions at once. Each session has a
CSRF token that the page echoes in a header (double submit), checked on every
state-changing request made with the cookie.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import threading
import unicodedata
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from parley import limits
from parley.config import Settings
from parley.store import (
    Deleted,
    conversations,
    delete_conversations,
    metadata,
    upsert_insert,
)

SESSION_DAYS = 30
SESSION_COOKIE = "parley_session"
CSRF_COOKIE = "parley_csrf"
CSRF_HEADER = "X-CSRF-Token"
# Failed sign-ins are counted over this window, sign-ups from one address over the next.
SIGN_IN_WINDOW_SECONDS = 300
SIGN_UP_WINDOW_SECONDS = 3600
USERNAME_KEY_MAX_CHARS = 255

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    sa.Column("password_hash", sa.Text(), nullable=False),
    sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # What the account's data belongs to: random and never reused, unlike the name.
    sa.Column("uid", sa.String(36), nullable=False, unique=True),
    # The conversation of the example's API (/chat, /history) for this account.
    sa.Column("chat_conversation_id", sa.String(36), nullable=False),
    # ``username_key(username)``: names that differ only in case or Unicode spelling are
    # one account's.
    sa.Column("username_key", sa.String(USERNAME_KEY_MAX_CHARS), nullable=False),
    sa.Index("uq_users_username_key", "username_key", unique=True),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column(
        "user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("csrf_token", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_sessions_user", "user_id"),
)


api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column(
        "user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_api_tokens_user", "user_id"),
)

app_settings = sa.Table(
    "app_settings",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text(), nullable=False),
)


@dataclass(frozen=True, slots=True)
class ApiToken:
    id: int
    name: str
    created_at: datetime
    token: str | None = None  # only when just created: it is never shown again


class UsernameTaken(Exception):
    pass


class SignUpClosed(Exception):
    """``PARLEY_SIGNUP=false`` or an admin closed sign-up, and there is an account."""


class HashingBusy(Exception):
    """Too many passwords are being hashed or waiting to be: refused without hashing."""

    retry_after = 1


def username_key(name: str) -> str:
    """What makes two names one account's: NFKC-normalised and case-folded."""
    return unicodedata.normalize("NFKC", name).casefold()


@dataclass(frozen=True, slots=True)
class AccountLimits:
    sign_in_failures_per_account: int = 10  # in SIGN_IN_WINDOW_SECONDS
    sign_in_failures_per_address: int = 50  # in SIGN_IN_WINDOW_SECONDS
    signups_per_address: int = 20  # in SIGN_UP_WINDOW_SECONDS
    password_hashes_at_once: int = 1
    password_hash_queue: int = 32

    @classmethod
    def from_settings(cls, settings: Settings) -> AccountLimits:
        return cls(
            settings.sign_in_failures_per_account,
            settings.sign_in_failures_per_address,
            settings.signups_per_address,
            settings.password_hashes_at_once,
            settings.password_hash_queue,
        )


_T = TypeVar("_T")


class PasswordHashing:
    """Argon2 off the event loop, at most ``at_once`` hashes at a time in this process and
    at most ``queue`` more waiting; beyond that ``run`` raises ``HashingBusy`` at once.

    One Argon2 hash (argon2-cffi's defaults: 64 MiB, 3 passes, 4 lanes in threads of its
    own) keeps about one and a half cores busy for a tenth of a second, so on two cores
    one at a time leaves the event loop a core. The threads are this object's own, and a
    hash counts until its thread is done with it, even if the request that asked for it
    is gone.
    """

    def __init__(self, at_once: int, queue: int) -> None:
        self._threads = ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="argon2")
        self._most = at_once + queue
        self._pending = 0
        self._lock = threading.Lock()

    async def run(self, function: Callable[..., _T], *args: Any) -> _T:
        with self._lock:
            if self._pending >= self._most:
                raise HashingBusy
            self._pending += 1
        try:
            future = self._threads.submit(function, *args)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)

    def _done(self, _future: Future[Any] | None) -> None:
        with self._lock:
            self._pending -= 1


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    username: str
    is_admin: bool
    # The immutable id that owns the account's conversations (see ``users.uid``).
    uid: str
    chat_conversation_id: str


@dataclass(frozen=True, slots=True)
class Session:
    user: Account
    csrf_token: str


@dataclass(frozen=True, slots=True)
class NewSession:
    token: str
    csrf_token: str
    max_age: int


# The columns an ``Account`` is made of, for every query that reads one.
_ACCOUNT_COLUMNS = (
    users.c.id,
    users.c.username,
    users.c.is_admin,
    users.c.uid,
    users.c.chat_conversation_id,
)


def _account(row: sa.Row[Any]) -> Account:
    return Account(row.id, row.username, row.is_admin, row.uid, row.chat_conversation_id)


def _named(username: str) -> sa.Select[Any]:
    """The account of a name: the exact name first, else the one whose key it shares (two
    names from before names were compared without case may share one: migration 0007)."""
    exact = users.c.username == username
    return (
        sa.select(users)
        .where(sa.or_(exact, users.c.username_key == username_key(username)))
        .order_by(exact.desc())
        .limit(1)
    )


def _sign_in_keys(username: str, address: str) -> tuple[str, str]:
    """The rate-limit keys of a sign-in: the name's (hashed, so that the table holds no
    names and any name fits) and the address's."""
    name = hashlib.sha256(username_key(username).encode()).hexdigest()
    return f"sign-in:account:{name}", f"sign-in:address:{address}"[: limits.KEY_MAX_CHARS]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def session_secret(settings: Settings) -> bytes:
    """The configured secret, or one generated once and kept in the data directory.

    Replicas sharing a database must share it: set ``PARLEY_SESSION_SECRET``.
    """
    if settings.session_secret is not None:
        return settings.session_secret.get_secret_value().encode()
    path = Path(settings.data_dir) / "session-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


class Accounts:
    def __init__(
        self, engine: AsyncEngine, secret: bytes, limits: AccountLimits | None = None
    ) -> None:
        self.engine = engine
        self.secret = secret
        self.limits = limits or AccountLimits()
        self.hasher = PasswordHasher()
        self.hashing = PasswordHashing(
            self.limits.password_hashes_at_once, self.limits.password_hash_queue
        )
        # Verified against when the name is unknown, so that both cases take as long.
        self._decoy = self.hasher.hash(secrets.token_hex(16))
        self._insert = upsert_insert(engine.dialect.name)
        # Sign-in and sign-up transactions of this process take turns here, not in the
        # database: a flood of them waits without holding pooled connections that other
        # requests need, and SQLite's writers do not pile up in its busy handler, which
        # sleeps. What they decide is still decided in the database, across processes.
        self._gate = asyncio.Semaphore(4 if engine.dialect.name == "postgresql" else 1)

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        async with self._gate, self.engine.begin() as conn:
            yield conn

    def _digest(self, token: str) -> str:
        return hmac.new(self.secret, token.encode(), hashlib.sha256).hexdigest()

    async def sign_up(
        self, username: str, password: str, *, address: str = "", signup_enabled: bool = True
    ) -> Account:
        """Create a user; the first one is an admin.

        Raises ``SignUpClosed`` (``signup_enabled`` is ``PARLEY_SIGNUP``; an admin's
        setting is read here), ``UsernameTaken``, ``limits.Limited`` (too many sign-ups
        from ``address``) or ``HashingBusy``, all but the last two before hashing.
        """
        key = username_key(username)
        address_key = f"sign-up:address:{address}"[: limits.KEY_MAX_CHARS]
        # Before hashing: these refusals cost no Argon2. The count for the address stays
        # only if the sign-up goes on to hashing.
        async with self._begin() as conn:
            closed = not signup_enabled or await self._signup_setting(conn) == "closed"
            if closed and await conn.scalar(sa.select(sa.exists().select_from(users))):
                raise SignUpClosed
            if await conn.scalar(sa.select(sa.exists().where(users.c.username_key == key))):
                raise UsernameTaken(username)
            await limits.take(
                conn, address_key, self.limits.signups_per_address, SIGN_UP_WINDOW_SECONDS
            )
        try:
            password_hash = await self.hashing.run(self.hasher.hash, password)
        except HashingBusy:
            async with self._begin() as conn:
                await limits.give_back(conn, address_key)
            raise
        async with self._begin() as conn:
            # The settled decisions, atomic with the insert: the sign-up setting's row is
            # upserted first, which makes concurrent sign-ups (and an admin closing
            # sign-up) wait for each other's commit, on either database; then whether
            # any account exists decides both a closed sign-up and the first admin.
            setting = await self._lock_signup_setting(conn)
            existing = await conn.scalar(sa.select(sa.exists().select_from(users)))
            if existing and (not signup_enabled or setting == "closed"):
                raise SignUpClosed
            try:
                result = await conn.execute(
                    users.insert()
                    .values(
                        username=username,
                        username_key=key,
                        password_hash=password_hash,
                        is_admin=not existing,
                        created_at=datetime.now(UTC),
                        uid=str(uuid.uuid4()),
                        chat_conversation_id=str(uuid.uuid4()),
                    )
                    .returning(*_ACCOUNT_COLUMNS)
                )
            except sa.exc.IntegrityError:
                raise UsernameTaken(username) from None
            row = result.one()
        return _account(row)

    async def authenticate(
        self, username: str, password: str, *, address: str = ""
    ) -> Account | None:
        """The account, or None for a wrong name or password.

        Before hashing, one failure is counted for the name (as ``username_key`` spells
        it, whether or not the account exists) and one for ``address``, in one
        transaction: ``limits.Limited`` if either is spent, so that of any number of
        attempts at once no more than the limit are verified. A right password gives
        both back, as does ``HashingBusy``.
        """
        keys = _sign_in_keys(username, address)
        query = _named(username)
        async with self._begin() as conn:
            await limits.take(
                conn,
                keys[0],
                self.limits.sign_in_failures_per_account,
                SIGN_IN_WINDOW_SECONDS,
            )
            await limits.take(
                conn,
                keys[1],
                self.limits.sign_in_failures_per_address,
                SIGN_IN_WINDOW_SECONDS,
            )
            row = (await conn.execute(query)).one_or_none()
        stored = row.password_hash if row is not None else self._decoy
        try:
            await self.hashing.run(self.hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            return None
        except HashingBusy:
            await self._give_back(keys)
            raise
        if row is None:
            return None
        await self._give_back(keys)
        return _account(row)

    async def _give_back(self, keys: tuple[str, ...]) -> None:
        async with self._begin() as conn:
            for key in keys:
                await limits.give_back(conn, key)

    async def _signup_setting(self, conn: AsyncConnection) -> str | None:
        return await conn.scalar(
            sa.select(app_settings.c.value).where(app_settings.c.key == "signup")
        )

    async def _lock_signup_setting(self, conn: AsyncConnection) -> str:
        """The admin's sign-up setting, its row locked until the transaction ends."""
        insert = self._insert(app_settings).values(key="signup", value="open")
        return str(
            await conn.scalar(
                insert.on_conflict_do_update(
                    index_elements=[app_settings.c.key],
                    set_={"value": app_settings.c.value},
                ).returning(app_settings.c.value)
            )
        )

    async def open_session(self, user: Account) -> NewSession:
        """A fresh session (a new token at every sign-in: no session fixation)."""
        token, csrf_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            await conn.execute(
                sessions.insert().values(
                    token_hash=self._digest(token),
                    user_id=user.id,
                    csrf_token=csrf_token,
                    created_at=now,
                    expires_at=now + timedelta(days=SESSION_DAYS),
                )
            )
        return NewSession(token, csrf_token, SESSION_DAYS * 86400)

    async def session(self, token: str) -> Session | None:
        query = (
            sa.select(*_ACCOUNT_COLUMNS, sessions.c.csrf_token)
            .select_from(sessions.join(users, users.c.id == sessions.c.user_id))
            .where(
                sessions.c.token_hash == self._digest(token),
                sessions.c.expires_at > datetime.now(UTC),
            )
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        if row is None:
            return None
        return Session(_account(row), row.csrf_token)

    async def close_session(self, token: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                sessions.delete().where(sessions.c.token_hash == self._digest(token))
            )

    # --- API tokens ----------------------------------------------------------------

    async def create_token(self, user: Account, name: str) -> ApiToken:
        token = "parley_" + secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            token_id = await conn.scalar(
                api_tokens.insert()
                .values(user_id=user.id, name=name, token_hash=self._digest(token), created_at=now)
                .returning(api_tokens.c.id)
            )
        return ApiToken(int(token_id), name, now, token)

    async def tokens(self, user: Account) -> list[ApiToken]:
        query = (
            sa.select(api_tokens).where(api_tokens.c.user_id == user.id).order_by(api_tokens.c.id)
        )
        async with self.engine.connect() as conn:
            rows = await conn.execute(query)
            return [ApiToken(row.id, row.name, _aware(row.created_at)) for row in rows]

    async def revoke_token(self, user: Account, token_id: int) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                api_tokens.delete().where(
                    api_tokens.c.id == token_id, api_tokens.c.user_id == user.id
                )
            )
        return bool(result.rowcount)

    async def token_user(self, token: str) -> Account | None:
        query = (
            sa.select(*_ACCOUNT_COLUMNS)
            .select_from(api_tokens.join(users, users.c.id == api_tokens.c.user_id))
            .where(api_tokens.c.token_hash == self._digest(token))
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        return None if row is None else _account(row)

    # --- Administration -------------------------------------------------------------

    async def signup_open(self) -> bool:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                sa.select(app_settings.c.value).where(app_settings.c.key == "signup")
            )
        return value != "closed"

    async def set_signup(self, open_: bool) -> None:
        value = "open" if open_ else "closed"
        insert = self._insert(app_settings).values(key="signup", value=value)
        async with self.engine.begin() as conn:
            await conn.execute(
                insert.on_conflict_do_update(
                    index_elements=[app_settings.c.key], set_={"value": value}
                )
            )

    async def usernames(self) -> list[Account]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(users).order_by(users.c.id))
            return [_account(row) for row in rows]

    async def remove_user(self, username: str, *, keep: Account) -> Deleted | None:
        """Delete a user, every session and token of theirs, and all their conversations,
        in one transaction; their conversations as ``delete_conversations`` reports them.
        None if there is no such user; raises ``RemovingSelf`` for ``keep``."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(_named(username).with_for_update())).first()
            if row is None:
                return None
            if row.id == keep.id:
                raise RemovingSelf(username)
            deleted = await delete_conversations(conn, conversations.c.owner == row.uid)
            await conn.execute(sessions.delete().where(sessions.c.user_id == row.id))
            await conn.execute(api_tokens.delete().where(api_tokens.c.user_id == row.id))
            await conn.execute(users.delete().where(users.c.id == row.id))
        return deleted


class RemovingSelf(Exception):
    """An admin asked to remove their own account."""
