"""Parley's own tables: conversations and their visible messages.

Every write here is idempotent on the turn id, because a DBOS step can run twice: once
before a crash that came after the write committed but before DBOS recorded the step,
and again on recovery.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from parley.config import Settings

Role = Literal["user", "assistant"]

metadata = sa.MetaData()

conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("title", sa.String(200), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_conversations_owner_created", "owner", "created_at"),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column(
        "conversation_id",
        sa.String(36),
        sa.ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("turn_id", sa.String(128), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("content", sa.Text(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default="complete"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # One user message and one reply per turn: what makes a re-run step harmless.
    sa.UniqueConstraint("turn_id", "role", name="uq_messages_turn_role"),
    # History reads walk one conversation in id order.
    sa.Index("ix_messages_conversation_id", "conversation_id", "id"),
)

_SEED_NAMESPACE = uuid.UUID("5b0d5f5e-3f0c-4d8e-9a51-6a2f0c7d2e11")


def seed_conversation_id(username: str) -> str:
    """The conversation the example's API (``/chat``, ``/history``) uses for a name.

    Derived from the name, so two first requests of one user agree on it without a lookup.
    """
    return str(uuid.uuid5(_SEED_NAMESPACE, username))


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        dialect = sqlite if engine.dialect.name == "sqlite" else postgresql
        self._insert = dialect.insert

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        url = settings.store_database_url()
        if settings.uses_postgres:
            engine = create_async_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)
        else:
            engine = create_async_engine(url)
            sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    async def add_user_message(
        self, *, owner: str, conversation_id: str, turn_id: str, content: str
    ) -> None:
        """Store a turn's user message, creating the conversation on first use."""
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            await conn.execute(
                self._insert(conversations)
                .values(id=conversation_id, owner=owner, title="", created_at=now)
                .on_conflict_do_nothing(index_elements=["id"])
            )
            await conn.execute(self._message_insert(conversation_id, turn_id, "user", content, now))

    async def add_reply(self, *, conversation_id: str, turn_id: str, content: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                self._message_insert(
                    conversation_id, turn_id, "assistant", content, datetime.now(UTC)
                )
            )

    def _message_insert(
        self, conversation_id: str, turn_id: str, role: Role, content: str, now: datetime
    ) -> sa.Executable:
        return (
            self._insert(messages)
            .values(
                conversation_id=conversation_id,
                turn_id=turn_id,
                role=role,
                content=content,
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["turn_id", "role"])
        )

    async def history(self, conversation_id: str) -> list[Message]:
        query = (
            sa.select(messages.c.role, messages.c.content)
            .where(messages.c.conversation_id == conversation_id)
            .order_by(messages.c.id)
        )
        async with self.engine.connect() as conn:
            rows = await conn.execute(query)
            return [Message(role=row.role, content=row.content) for row in rows]

    async def turn_message(self, turn_id: str, role: Role) -> str | None:
        query = sa.select(messages.c.content).where(
            messages.c.turn_id == turn_id, messages.c.role == role
        )
        async with self.engine.connect() as conn:
            return (await conn.execute(query)).scalar_one_or_none()


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    # WAL lets history reads run while a turn writes; busy_timeout makes concurrent
    # writers wait for the lock instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# --- Set-up: the database itself and the migrations ---------------------------------


async def ensure_postgres_database(database_url: str) -> None:
    """Create the configured PostgreSQL database when it does not exist yet."""
    url = make_url(database_url).set(drivername="postgresql+asyncpg")
    name = url.database
    if not name:
        raise ValueError("DATABASE_URL names no database")
    engine = create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            exists = await conn.scalar(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            )
            if not exists:
                quoted = conn.dialect.identifier_preparer.quote_identifier(name)
                try:
                    await conn.execute(sa.text(f"CREATE DATABASE {quoted}"))
                except sa.exc.DBAPIError as error:
                    # Another replica starting at the same moment won the race.
                    if "already exists" not in str(error):
                        raise
    finally:
        await engine.dispose()


def alembic_config(settings: Settings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    # ``%`` is alembic's interpolation character; a password may contain one.
    config.set_main_option(
        "sqlalchemy.url", settings.store_database_url(sync=True).replace("%", "%%")
    )
    return config


def migrate_sync(settings: Settings) -> None:
    if not settings.uses_postgres:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), "head")


async def migrate(settings: Settings) -> None:
    """Bring the database to the newest schema (create it first on PostgreSQL)."""
    if settings.database_url is not None:
        await ensure_postgres_database(settings.database_url)
    # Alembic's API is synchronous; it runs once at start, off the event loop.
    await asyncio.to_thread(migrate_sync, settings)
