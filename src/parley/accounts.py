"""Accounts mode: users with passwords, server-side sessions, CSRF tokens.

Passwords are hashed with Argon2 (argon2-cffi), off the event loop: a hash takes tens of
milliseconds of CPU by design. A session is a random token in an HttpOnly cookie; the
database keeps only its HMAC under the server's secret, so a copy of the database does not
hold usable sessions. Signing out or removing a user deletes the rows, which ends the
sessions at once. Each session has a CSRF token that the page echoes in a header
(double submit), checked on every state-changing request made with the cookie.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.ext.asyncio import AsyncEngine

from parley.config import Settings
from parley.store import metadata

SESSION_DAYS = 30
SESSION_COOKIE = "parley_session"
CSRF_COOKIE = "parley_csrf"
CSRF_HEADER = "X-CSRF-Token"

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    sa.Column("password_hash", sa.Text(), nullable=False),
    sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
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


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    username: str
    is_admin: bool


@dataclass(frozen=True, slots=True)
class Session:
    user: Account
    csrf_token: str


@dataclass(frozen=True, slots=True)
class NewSession:
    token: str
    csrf_token: str
    max_age: int


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
    def __init__(self, engine: AsyncEngine, secret: bytes) -> None:
        self.engine = engine
        self.secret = secret
        self.hasher = PasswordHasher()
        # Verified against when the name is unknown, so that both cases take as long.
        self._decoy = self.hasher.hash(secrets.token_hex(16))

    def _digest(self, token: str) -> str:
        return hmac.new(self.secret, token.encode(), hashlib.sha256).hexdigest()

    async def sign_up(self, username: str, password: str) -> Account:
        """Create a user; the first one is an admin."""
        password_hash = await asyncio.to_thread(self.hasher.hash, password)
        async with self.engine.begin() as conn:
            existing = await conn.scalar(sa.select(sa.func.count()).select_from(users))
            try:
                result = await conn.execute(
                    users.insert()
                    .values(
                        username=username,
                        password_hash=password_hash,
                        is_admin=existing == 0,
                        created_at=datetime.now(UTC),
                    )
                    .returning(users.c.id, users.c.is_admin)
                )
            except sa.exc.IntegrityError:
                raise UsernameTaken(username) from None
            row = result.one()
        return Account(id=row.id, username=username, is_admin=row.is_admin)

    async def authenticate(self, username: str, password: str) -> Account | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(sa.select(users).where(users.c.username == username))
            ).one_or_none()
        stored = row.password_hash if row is not None else self._decoy
        try:
            await asyncio.to_thread(self.hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        return Account(id=row.id, username=row.username, is_admin=row.is_admin)

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
            sa.select(users.c.id, users.c.username, users.c.is_admin, sessions.c.csrf_token)
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
        return Session(Account(row.id, row.username, row.is_admin), row.csrf_token)

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
            sa.select(users.c.id, users.c.username, users.c.is_admin)
            .select_from(api_tokens.join(users, users.c.id == api_tokens.c.user_id))
            .where(api_tokens.c.token_hash == self._digest(token))
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        return None if row is None else Account(row.id, row.username, row.is_admin)

    # --- Administration -------------------------------------------------------------

    async def signup_open(self) -> bool:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                sa.select(app_settings.c.value).where(app_settings.c.key == "signup")
            )
        return value != "closed"

    async def set_signup(self, open_: bool) -> None:
        value = "open" if open_ else "closed"
        async with self.engine.begin() as conn:
            updated = await conn.execute(
                app_settings.update().where(app_settings.c.key == "signup").values(value=value)
            )
            if not updated.rowcount:
                await conn.execute(app_settings.insert().values(key="signup", value=value))

    async def usernames(self) -> list[Account]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(users).order_by(users.c.id))
            return [Account(row.id, row.username, row.is_admin) for row in rows]

    async def any_users(self) -> bool:
        async with self.engine.connect() as conn:
            return bool(await conn.scalar(sa.select(sa.func.count()).select_from(users)))

    async def remove_user(self, username: str) -> bool:
        """Delete a user and so every session of theirs."""
        async with self.engine.begin() as conn:
            user_id = await conn.scalar(sa.select(users.c.id).where(users.c.username == username))
            if user_id is None:
                return False
            await conn.execute(sessions.delete().where(sessions.c.user_id == user_id))
            await conn.execute(api_tokens.delete().where(api_tokens.c.user_id == user_id))
            await conn.execute(users.delete().where(users.c.id == user_id))
        return True
