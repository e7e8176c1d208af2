"""Parley's own tables: conversations and their visible messages.

Every write here is idempotent on the turn id, because a DBOS step can run twice: once
before a crash that came after the write committed but before DBOS recorded the step,
and again on recovery.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pydantic_core
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from parley.config import Settings

Role = Literal["user", "assistant"]
Status = Literal["complete", "streaming", "stopped", "failed"]

DEFAULT_TITLE = "New chat"
TITLE_MAX_CHARS = 200
MODEL_NAME_MAX_CHARS = 64
# A conversation named after its first message takes this much of it.
_AUTO_TITLE_CHARS = 60

metadata = sa.MetaData()
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    # Empty until the first message names it (or the owner does).
    sa.Column("title", sa.String(TITLE_MAX_CHARS), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # The last message of the branch the conversation shows, and whether it has more than
    # one branch (one that has not is read in id order, the cheaper way).
    sa.Column("leaf_id", _ID, nullable=True),
    sa.Column("branched", sa.Boolean(), nullable=False, server_default=sa.false()),
    # The model (a name from ``Settings.models``) and the instructions its turns use;
    # null: the default ones.
    sa.Column("model", sa.String(MODEL_NAME_MAX_CHARS), nullable=True),
    sa.Column("system_prompt", sa.Text(), nullable=True),
    # Where an imported conversation came from (``parley.archive``): importing it again
    # finds it here instead of making a copy.
    sa.Column("imported_from", sa.String(80), nullable=True),
    sa.Index("ix_conversations_owner_created", "owner", "created_at"),
    sa.Index("uq_conversations_imported_from", "owner", "imported_from", unique=True),
    sa.Index("ix_conversations_owner_id", "owner", "id"),
    sa.Index("ix_conversations_owner_updated", "owner", "updated_at"),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", _ID, primary_key=True),
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
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("stop_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("epochs", sa.Integer(), nullable=False, server_default="0"),
    # A reader in another process follows this reply: see ``parley.streams``.
    sa.Column("followed_elsewhere", sa.Boolean(), nullable=False, server_default=sa.false()),
    # The reply's round in the provider's queue, while limits are set (``parley.pacing``).
    sa.Column("queue_round", sa.Integer(), nullable=True),
    # The message before this one on its branch: a reply's is the user message it answers,
    # a user message's the reply it follows (null for a conversation's first). Versions
    # of one message (edits, regenerated replies) share a parent.
    sa.Column("parent_id", _ID, nullable=True),
    # One user message and one reply per turn: what makes a re-run step harmless.
    sa.UniqueConstraint("turn_id", "role", name="uq_messages_turn_role"),
    # History reads walk one conversation in id order.
    sa.Index("ix_messages_conversation_id", "conversation_id", "id"),
    # A message's versions and children; a conversation's first messages (null parent).
    sa.Index("ix_messages_parent", "parent_id", "conversation_id"),
    # The rounds of the replies still being written, and nothing else.
    sa.Index(
        "ix_messages_queue_round",
        "queue_round",
        sqlite_where=sa.text("status = 'streaming' AND queue_round IS NOT NULL"),
        postgresql_where=sa.text("status = 'streaming' AND queue_round IS NOT NULL"),
    ),
    # One reply in progress per conversation.
    sa.Index(
        "uq_messages_one_streaming",
        "conversation_id",
        unique=True,
        sqlite_where=sa.text("status = 'streaming'"),
        postgresql_where=sa.text("status = 'streaming'"),
    ),
)

# Which turn an Idempotency-Key named. It goes with its conversation, so a key used in a
# deleted conversation names nothing afterwards (and can never bring its reply back).
turn_keys = sa.Table(
    "turn_keys",
    metadata,
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("turn_id", sa.String(128), nullable=False),
    sa.Column(
        "conversation_id",
        sa.String(36),
        sa.ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    # What the request asked for (a digest: see ``parley.turns.request_digest``); null
    # for keys stored before edits and regenerations, which were all new messages.
    sa.Column("request", sa.String(64), nullable=True),
    sa.PrimaryKeyConstraint("owner", "key_hash"),
    sa.Index("ix_turn_keys_conversation", "conversation_id"),
)

# What a deletion still has to remove outside these tables (the model's memory, DBOS's
# records of the turns), written by the deleting transaction: see ``parley.deletion``.
deleted_conversations = sa.Table(
    "deleted_conversations",
    metadata,
    sa.Column("conversation_id", sa.String(36), primary_key=True),
    sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
)
deleted_turns = sa.Table(
    "deleted_turns",
    metadata,
    sa.Column("turn_id", sa.String(128), primary_key=True),
    sa.Column("conversation_id", sa.String(36), nullable=False),
    sa.Index("ix_deleted_turns_conversation", "conversation_id"),
)

# On PostgreSQL, what a process asks of a reply another may be writing (a reader follows
# it, a client stops it) is also sent on this channel: see ``parley.streams.listen``.
REPLY_REQUESTS_CHANNEL = "parley_replies"

_SEED_NAMESPACE = uuid.UUID("5b0d5f5e-3f0c-4d8e-9a51-6a2f0c7d2e11")


def seed_conversation_id(username: str) -> str:
    """The conversation the example's API (``/chat``, ``/history``) uses for a name.

    Derived from the name, so two first requests of one user agree on it without a lookup.
    """
    return str(uuid.uuid5(_SEED_NAMESPACE, username))


# PostgreSQL's classes of errors that pass: a connection failed (08), out of resources,
# such as "too many clients" (53), the server shutting down or starting up (57P).
_PASSING_SQLSTATES = ("08", "53", "57P")


def _sqlstate(error: BaseException | None) -> str:
    """The SQLSTATE of a driver's error (asyncpg's, possibly wrapped by SQLAlchemy's
    adapter; psycopg's), or ""."""
    for candidate in (error, getattr(error, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return ""


def is_transient(error: BaseException) -> bool:
    """Whether a database error may pass if the operation is tried again: the server is
    restarting or unreachable, a connection broke, the pool has no free connection,
    SQLite's file is locked or its disk full."""
    import sqlite3

    import psycopg

    if isinstance(error, sa.exc.TimeoutError):
        return True  # every pooled connection is busy: overload, which passes
    if isinstance(error, sa.exc.DBAPIError):
        return (
            error.connection_invalidated
            or isinstance(error, sa.exc.OperationalError | sa.exc.InterfaceError)
            or _sqlstate(error.orig).startswith(_PASSING_SQLSTATES)
        )
    return isinstance(
        error,
        psycopg.OperationalError
        | psycopg.InterfaceError
        | sqlite3.OperationalError
        | ConnectionError
        | TimeoutError,
    )


class ConversationNotFound(Exception):
    """No such conversation, or not the caller's: the two are not told apart."""


class ConversationBusy(Exception):
    """A reply is still being written in the conversation (begun at ``since``)."""

    def __init__(self, turn_id: str, since: datetime | None) -> None:
        super().__init__(turn_id)
        self.turn_id = turn_id
        self.since = since


class MessageRefused(Exception):
    """A message a request names cannot be used as asked: ``missing`` when there is no
    such message in the conversation, otherwise the wrong kind (``reason`` says which)."""

    def __init__(self, reason: str, *, missing: bool, field: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing
        self.field = field


class KeyTaken(Exception):
    """Another request took this idempotency key first: look its turn up again."""


class TooManyTurns(Exception):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class TurnLimits:
    """Accounts mode: how many turns a user may start a minute and have running at once."""

    per_minute: int
    at_once: int


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    title: str
    created_at: datetime
    updated_at: datetime
    model: str | None = None
    system_prompt: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    turn_id: str
    role: Role
    content: str
    status: Status
    created_at: datetime
    error: str | None = None
    # How many times the model was asked for this reply: the epochs of its event stream.
    epochs: int = 0
    parent_id: int | None = None


@dataclass(frozen=True, slots=True)
class Branch:
    """A page of a conversation's branch, oldest first; each message's versions (the ids
    of its siblings, itself included, oldest first); whether older messages exist."""

    messages: list[Message]
    siblings: dict[int, list[int]]
    has_more: bool


@dataclass(frozen=True, slots=True)
class Said:
    """A message as the model is shown it: no more of it is read for a turn."""

    turn_id: str
    role: Role
    content: str
    status: Status


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What a turn's model step needs: the user message it answers, the messages before
    it on its branch that the model may be shown (oldest first; without failed turns and
    empty replies), and the conversation's model and instructions (null: the defaults)."""

    prompt: Said
    history: list[Said]
    model: str | None
    system_prompt: str | None


@dataclass(frozen=True, slots=True)
class Turn:
    """What the API needs to know about a turn: whose it is and how its reply stands."""

    turn_id: str
    conversation_id: str
    owner: str
    text: str
    reply_status: Status
    # What the idempotency key that named it asked for (``keyed_turn`` only).
    request: str | None = None


@dataclass(frozen=True, slots=True)
class ReplyFlags:
    """Of some turns being written: those asked to stop, and those followed elsewhere."""

    stopped: set[str]
    followed: set[str]


@dataclass(frozen=True, slots=True)
class Started:
    """The first step of a model run: its epoch, and whether a stop came first."""

    epoch: int
    stop_requested: bool


def _title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _AUTO_TITLE_CHARS else line[: _AUTO_TITLE_CHARS - 1] + "…"


def _conversation(row: sa.Row[Any]) -> Conversation:
    return Conversation(
        id=row.id,
        title=row.title or DEFAULT_TITLE,
        created_at=_aware(row.created_at),
        updated_at=_aware(row.updated_at),
        model=row.model,
        system_prompt=row.system_prompt,
    )


def _message(row: sa.Row[Any]) -> Message:
    return Message(
        id=row.id,
        turn_id=row.turn_id,
        role=row.role,
        content=row.content,
        status=row.status,
        created_at=_aware(row.created_at),
        error=row.error,
        epochs=row.epochs,
        parent_id=row.parent_id,
    )


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything Parley stores is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class _TurnStatements:
    """The statements every turn runs, built once.

    Built per call, SQLAlchemy would construct each statement and compute its cache key
    on every turn, and the two-row ``VALUES`` of the turn's messages would be compiled
    afresh every time (a multi-row ``VALUES`` is never cached): about half
    of the store's CPU per turn. Values come as bound parameters (``b_`` names, which
    cannot clash with the columns SQLAlchemy binds by name).
    """

    def __init__(self, insert: Any) -> None:
        turn = sa.bindparam("b_turn")
        reply = sa.and_(messages.c.turn_id == turn, messages.c.role == "assistant")
        # The first message names the conversation; later ones only touch it.
        touched = {
            "updated_at": sa.bindparam("b_now"),
            "title": sa.case(
                (conversations.c.title == "", sa.bindparam("b_title")),
                else_=conversations.c.title,
            ),
        }
        now = sa.bindparam("b_now", type_=conversations.c.created_at.type)
        # Not while a deletion of the same id (the example's conversations have fixed
        # ids) is still removing its turns and memory: the new one would inherit them.
        being_deleted = sa.exists().where(
            deleted_conversations.c.conversation_id == sa.bindparam("b_id")
        )
        new = insert(conversations).from_select(
            ["id", "owner", "title", "created_at", "updated_at"],
            sa.select(
                sa.bindparam("b_id", type_=conversations.c.id.type),
                sa.bindparam("b_owner", type_=conversations.c.owner.type),
                sa.bindparam("b_title", type_=conversations.c.title.type),
                now,
                now,
            ).where(~being_deleted),
        )
        self.claim_new = new.on_conflict_do_update(
            index_elements=["id"],
            set_=touched,
            # Someone else's conversation is left alone, and counts as not found.
            where=conversations.c.owner == sa.bindparam("b_owner"),
        ).returning(conversations.c.branched)
        self.claim = (
            conversations.update()
            .where(
                conversations.c.id == sa.bindparam("b_id"),
                conversations.c.owner == sa.bindparam("b_owner"),
            )
            .values(touched)
            .returning(conversations.c.branched)
        )
        # A turn's messages. A new user message follows the end of the conversation's
        # branch: its latest message, unless it has branches (then the branch it shows).
        # Run after ``claim``, which locks the conversation, so that the end read is the
        # end still when the message is stored.
        latest = messages.alias("latest")
        shown = conversations.alias("shown")
        branch_end = (
            sa.select(
                sa.case(
                    (shown.c.branched, shown.c.leaf_id),
                    else_=sa.select(sa.func.max(latest.c.id))
                    .where(latest.c.conversation_id == sa.bindparam("b_id"))
                    .scalar_subquery(),
                )
            )
            .where(shown.c.id == sa.bindparam("b_id"))
            .scalar_subquery()
        )
        message = {
            "conversation_id": sa.bindparam("b_id"),
            "turn_id": turn,
            "content": sa.bindparam("b_content"),
            "created_at": now,
        }
        user_message = insert(messages).values({**message, "role": "user", "status": "complete"})
        self.insert_user_next = (
            user_message.values(parent_id=branch_end)
            .on_conflict_do_nothing(index_elements=["turn_id", "role"])
            .returning(messages.c.id)
        )
        parent = sa.bindparam("b_parent", type_=messages.c.parent_id.type)
        self.insert_user_at = (
            user_message.values(parent_id=parent)
            .on_conflict_do_nothing(index_elements=["turn_id", "role"])
            .returning(messages.c.id)
        )
        self.insert_reply = (
            insert(messages)
            .values(
                {
                    **message,
                    "content": "",
                    "role": "assistant",
                    "status": "streaming",
                    "parent_id": parent,
                }
            )
            .on_conflict_do_nothing(index_elements=["turn_id", "role"])
            .returning(messages.c.id)
        )
        before = messages.alias("before")
        first = messages.alias("first")
        self.link_line = (
            messages.update()
            .where(
                messages.c.conversation_id == sa.bindparam("b_id"),
                messages.c.parent_id.is_(None),
                messages.c.id
                > sa.select(sa.func.min(first.c.id))
                .where(first.c.conversation_id == sa.bindparam("b_id"))
                .scalar_subquery(),
            )
            .values(
                parent_id=sa.select(sa.func.max(before.c.id))
                .where(
                    before.c.conversation_id == sa.bindparam("b_id"),
                    before.c.id < messages.c.id,
                )
                .scalar_subquery()
            )
        )
        self.target = sa.select(messages.c.role, messages.c.parent_id).where(
            messages.c.id == sa.bindparam("b_message"),
            messages.c.conversation_id == sa.bindparam("b_id"),
        )
        self.branch_to = (
            conversations.update()
            .where(conversations.c.id == sa.bindparam("b_id"))
            .values(leaf_id=sa.bindparam("b_leaf"), branched=True)
        )
        # A reply no longer being written (failed as an orphan meanwhile) gets no new run.
        self.start_run = (
            messages.update()
            .where(reply, messages.c.status == "streaming")
            .values(epochs=messages.c.epochs + 1)
            .returning(messages.c.epochs, messages.c.stop_requested)
        )
        reply_conversation = sa.select(messages.c.conversation_id).where(reply)
        self.touch_for_reply = (
            conversations.update()
            .where(conversations.c.id == reply_conversation.scalar_subquery())
            .values(updated_at=sa.bindparam("b_now"))
        )
        self.reply = sa.select(messages).where(reply)
        self.being_deleted = sa.select(being_deleted)
        self.insert_key = (
            insert(turn_keys)
            .values(
                owner=sa.bindparam("b_owner"),
                key_hash=sa.bindparam("b_key"),
                turn_id=turn,
                conversation_id=sa.bindparam("b_id"),
                request=sa.bindparam("b_request"),
            )
            .on_conflict_do_nothing(index_elements=["owner", "key_hash"])
            .returning(turn_keys.c.turn_id)
        )
        # Only a reply still being written is finished: one that was failed as an orphan,
        # or finished by an earlier run of the step, stays as it is.
        self.finish_reply = (
            messages.update()
            .where(reply, messages.c.status == "streaming")
            .values(
                content=sa.bindparam("b_content"),
                status=sa.bindparam("b_status"),
                error=sa.bindparam("b_error"),
            )
            .returning(*messages.c)
        )
        # A turn, by its id or by the idempotency key that named it: who owns it, what
        # was asked (the user message its reply answers: its parent, or, for a reply
        # stored by a release before branches, the user message of its own turn), how
        # its reply stands.
        user = messages.alias("user_message")
        answer = messages.alias("reply")
        answered = sa.or_(
            user.c.id == answer.c.parent_id,
            sa.and_(
                answer.c.parent_id.is_(None),
                user.c.turn_id == answer.c.turn_id,
                user.c.role == "user",
            ),
        )
        a_turn = sa.select(
            answer.c.turn_id,
            answer.c.conversation_id,
            user.c.content,
            conversations.c.owner,
            answer.c.status,
        ).select_from(
            answer.join(conversations, conversations.c.id == answer.c.conversation_id).join(
                user, answered
            )
        )
        self.turn = a_turn.where(answer.c.turn_id == turn, answer.c.role == "assistant")
        self.keyed_turn = (
            a_turn.add_columns(turn_keys.c.request)
            .join(
                turn_keys,
                sa.and_(
                    turn_keys.c.turn_id == answer.c.turn_id,
                    turn_keys.c.owner == sa.bindparam("b_owner"),
                    turn_keys.c.key_hash == sa.bindparam("b_key"),
                ),
            )
            .where(answer.c.role == "assistant")
        )


def upsert_insert(dialect: str) -> Callable[[sa.Table], Any]:
    """The ``insert`` of a database dialect's own (with ``on_conflict_do_...``)."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def db_epoch(dialect: str) -> sa.ColumnElement[float]:
    """Seconds since the epoch by the database's clock (one value per statement), for the
    times that processes on several hosts compare: the hosts' clocks never meet."""
    if dialect == "postgresql":
        return sa.cast(sa.extract("epoch", sa.func.statement_timestamp()), sa.Float)
    return (sa.func.julianday("now") - 2440587.5) * 86400.0


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._turn_sql = _TurnStatements(upsert_insert(engine.dialect.name))

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        url = settings.store_database_url()
        if settings.uses_postgres:
            # No pre-ping: it costs a round trip per checkout, about a tenth of a turn's
            # CPU. A connection that died with its server is discarded (with the rest of
            # the pool) on first use, and that one request gets a 503.
            engine = create_async_engine(
                url,
                # A failed statement is logged without its values: they are chat text.
                hide_parameters=True,
                pool_size=settings.pool_sizes.store,
                max_overflow=0,
                pool_timeout=settings.db_timeout,
                connect_args={
                    "server_settings": {"application_name": "parley"},
                    "timeout": settings.db_timeout,
                    "command_timeout": settings.db_statement_timeout,
                },
            )
        else:
            engine = create_async_engine(
                url,
                hide_parameters=True,
                pool_timeout=settings.db_timeout,
                connect_args={"timeout": settings.db_timeout},
            )
            sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # --- Conversations ---------------------------------------------------------------

    async def create_conversation(
        self, owner: str, title: str | None = None, *, account: bool = False
    ) -> Conversation:
        """A new conversation of ``owner`` (with ``account``, an account's uid, which must
        still exist when the conversation is stored)."""
        now = datetime.now(UTC)
        conversation_id = str(uuid.uuid4())
        async with self.engine.begin() as conn:
            await conn.execute(
                conversations.insert().values(
                    id=conversation_id,
                    owner=owner,
                    title=title or "",
                    created_at=now,
                    updated_at=now,
                )
            )
            if account:  # after a write: on SQLite, only a write begins the transaction
                await check_account(conn, owner)
        return Conversation(conversation_id, title or DEFAULT_TITLE, now, now)

    async def conversations(
        self,
        owner: str,
        *,
        limit: int,
        before: datetime | None = None,
        before_id: str | None = None,
    ) -> list[Conversation]:
        """The owner's conversations, the most recently active first.

        A page continues from the last one of the page before: ``before`` its time and
        ``before_id`` its id, since several conversations can share one time.
        """
        query = (
            sa.select(conversations)
            .where(conversations.c.owner == owner)
            .order_by(conversations.c.updated_at.desc(), conversations.c.id.desc())
            .limit(limit)
        )
        if before is not None and before_id is not None:
            query = query.where(
                sa.or_(
                    conversations.c.updated_at < before,
                    sa.and_(conversations.c.updated_at == before, conversations.c.id < before_id),
                )
            )
        elif before is not None:
            query = query.where(conversations.c.updated_at < before)
        async with self.engine.connect() as conn:
            return [_conversation(row) for row in await conn.execute(query)]

    async def conversation(self, owner: str, conversation_id: str) -> Conversation:
        query = sa.select(conversations).where(
            conversations.c.id == conversation_id, conversations.c.owner == owner
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        if row is None:
            raise ConversationNotFound(conversation_id)
        return _conversation(row)

    async def update_conversation(self, owner: str, conversation_id: str, **values: Any) -> None:
        """Set any of ``title``, ``model`` and ``system_prompt`` (null: the default)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                conversations.update()
                .where(conversations.c.id == conversation_id, conversations.c.owner == owner)
                .values(**values)
            )
        if result.rowcount == 0:
            raise ConversationNotFound(conversation_id)

    async def streaming_turns(self, conversation_id: str) -> list[tuple[str, datetime]]:
        """The turns whose replies are being written in a conversation, with when each
        began."""
        query = sa.select(messages.c.turn_id, messages.c.created_at).where(
            messages.c.conversation_id == conversation_id, messages.c.status == "streaming"
        )
        async with self.engine.connect() as conn:
            return [(turn_id, _aware(at)) for turn_id, at in await conn.execute(query)]

    async def queue_round(self, turn_id: str, owner: str) -> int:
        """Give a turn about to be queued its round, and return it (``parley.pacing``):
        one past the owner's highest among replies still being written, and no lower than
        the lowest any holds. A turn keeps the round it was given first.

        One statement, which SQLite runs under its write lock; on PostgreSQL, under a lock
        on the owner for the transaction, so that an owner's turns queued at the same
        instant still get rounds of their own.
        """
        other = messages.alias("other")
        unfinished = sa.and_(
            other.c.status == "streaming",
            other.c.role == "assistant",
            other.c.queue_round.is_not(None),
        )
        lowest = sa.select(sa.func.min(other.c.queue_round)).where(unfinished)
        owners = (
            sa.select(sa.func.max(other.c.queue_round))
            .select_from(other.join(conversations))
            .where(unfinished, conversations.c.owner == owner)
        )
        async with self.engine.begin() as conn:
            postgres = conn.dialect.name == "postgresql"
            if postgres:
                lock = sa.func.pg_advisory_xact_lock(sa.func.hashtext(f"parley-round {owner}"))
                await conn.execute(sa.select(lock))
            higher = sa.func.greatest if postgres else sa.func.max
            queue_round = higher(
                sa.func.coalesce(lowest.scalar_subquery(), 1),
                sa.func.coalesce(owners.scalar_subquery(), 0) + 1,
            )
            reply = sa.and_(messages.c.turn_id == turn_id, messages.c.role == "assistant")
            given = await conn.scalar(
                messages.update()
                .where(reply, messages.c.queue_round.is_(None))
                .values(queue_round=queue_round)
                .returning(messages.c.queue_round)
            )
            if given is None:  # it has one already (a retried request), or is gone
                given = await conn.scalar(sa.select(messages.c.queue_round).where(reply))
        # A reply gone (its conversation deleted meanwhile): its turn has nothing to do.
        return int(given) if given is not None else 1

    async def delete_conversation(self, owner: str, conversation_id: str) -> Deleted:
        """Delete a conversation of ``owner`` (see ``delete_conversations``)."""
        async with self.engine.begin() as conn:
            deleted = await delete_conversations(
                conn,
                sa.and_(conversations.c.id == conversation_id, conversations.c.owner == owner),
            )
        if not deleted.conversation_ids:
            raise ConversationNotFound(conversation_id)
        return deleted

    async def deletions(self, limit: int, after: str = "") -> list[str]:
        """Deleted conversations whose memory and turns are still to be removed, in id
        order after ``after`` (so that a page of ones that must wait hides no others)."""
        column = deleted_conversations.c.conversation_id
        query = sa.select(column).where(column > after).order_by(column).limit(limit)
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).scalars())

    async def deleted_turns(self, conversation_id: str) -> list[str]:
        query = sa.select(deleted_turns.c.turn_id).where(
            deleted_turns.c.conversation_id == conversation_id
        )
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).scalars())

    async def forget_deletion(self, conversation_id: str) -> None:
        """Everything of a deleted conversation is gone: drop its to-do rows."""
        async with self.engine.begin() as conn:
            await conn.execute(
                deleted_turns.delete().where(deleted_turns.c.conversation_id == conversation_id)
            )
            await conn.execute(
                deleted_conversations.delete().where(
                    deleted_conversations.c.conversation_id == conversation_id
                )
            )

    # --- Messages --------------------------------------------------------------------

    async def begin_turn(
        self,
        *,
        owner: str,
        conversation_id: str,
        turn_id: str,
        content: str,
        create_conversation: bool = False,
        key_hash: str | None = None,
        request: str | None = None,
        limits: TurnLimits | None = None,
        replaces: int | None = None,
        regenerates: int | None = None,
    ) -> bool:
        """Store a turn's user message and an empty reply being written, in one transaction,
        with the idempotency key that names the turn (and ``request``, what it asked
        for), if any; whether the turn is new (beginning one that exists changes nothing).

        The message follows the end of the conversation's branch; with ``replaces`` (a
        user message's id) it is a new version of that message instead, and with
        ``regenerates`` (a reply's id) the turn stores no user message, only a new
        version of that reply, answering the same one. Either way the new branch becomes
        the one the conversation shows.

        Raises ``TooManyTurns`` beyond ``limits``; ``ConversationNotFound`` if the
        conversation is not the owner's (or, unless ``create_conversation``, does not
        exist); ``MessageRefused`` if ``replaces`` or ``regenerates`` names no message of
        the conversation, or one of the wrong role; ``KeyTaken`` if another request
        stored a turn under the same key first; ``ConversationBusy`` if another reply is
        still being written in it. Each check and the writes it guards are one
        transaction, so parallel requests cannot all pass a check that only some of them
        may.
        """
        now = datetime.now(UTC)
        sql = self._turn_sql
        values: dict[str, Any] = {
            "b_id": conversation_id,
            "b_owner": owner,
            "b_title": _title_from(content),
            "b_now": now,
            "b_turn": turn_id,
            "b_content": content,
            "b_request": request,
        }
        try:
            async with self.engine.begin() as conn:
                if limits is not None:
                    await _check_limits(conn, owner, limits)
                    await check_account(conn, owner)
                claim = sql.claim_new if create_conversation else sql.claim
                claimed = (await conn.execute(claim, values)).first()
                if claimed is None:
                    if create_conversation and await conn.scalar(sql.being_deleted, values):
                        raise ConversationBusy("", None)  # wait for the deletion to end
                    raise ConversationNotFound(conversation_id)
                if key_hash is not None:
                    keyed = {**values, "b_key": key_hash}
                    if (await conn.execute(sql.insert_key, keyed)).first() is None:
                        raise KeyTaken(key_hash)
                branching = replaces is not None or regenerates is not None
                if branching and not claimed.branched:
                    # Its first branch. Until now it was one line, read in id order, where a
                    # release before branches may have stored messages without a parent:
                    # each gets the message before it, so that every branch walks whole.
                    await conn.execute(sql.link_line, values)
                if branching:
                    target = replaces if replaces is not None else regenerates
                    role = "user" if replaces is not None else "assistant"
                    looked = await conn.execute(sql.target, {**values, "b_message": target})
                    found = looked.first()
                    if found is None:
                        raise MessageRefused("is not a message of this conversation", missing=True)
                    if found.role != role:
                        raise MessageRefused(
                            "must be one of your own messages (a reply cannot be edited)"
                            if role == "user"
                            else "must be a reply (only replies can be regenerated)",
                            missing=False,
                        )
                    values["b_parent"] = found.parent_id
                if regenerates is None:
                    user = sql.insert_user_at if branching else sql.insert_user_next
                    user_id = (await conn.execute(user, values)).scalar()
                    if user_id is None:
                        return False  # stored before
                    values["b_parent"] = user_id
                reply_id = (await conn.execute(sql.insert_reply, values)).scalar()
                if reply_id is None:
                    return False
                if branching or claimed.branched:
                    await conn.execute(sql.branch_to, {**values, "b_leaf": reply_id})
        except sa.exc.IntegrityError:
            # Only the one-reply-in-progress index can object: turn ids are handled above.
            busy = await self.streaming_turns(conversation_id)
            raise (ConversationBusy(*busy[0]) if busy else ConversationBusy("", None)) from None
        return True

    async def fail_orphan(self, turn_id: str, error: str) -> None:
        """Mark a reply that no workflow will ever write as failed."""
        await self._update_reply_in_progress(turn_id, status="failed", error=error)

    async def start_model_run(self, turn_id: str) -> Started:
        """Count one more run of the model for this turn; its number is the new epoch."""
        async with self.engine.begin() as conn:
            result = await conn.execute(self._turn_sql.start_run, {"b_turn": turn_id})
            row = result.one_or_none()
        if row is None:  # the conversation was deleted
            return Started(epoch=1, stop_requested=True)
        return Started(epoch=row.epochs, stop_requested=row.stop_requested)

    async def reply_flags(self, turn_ids: Sequence[str]) -> ReplyFlags:
        """What other processes asked of these turns' replies: a stop (a reply gone with
        its conversation counts as stopped too), or their pieces for a reader there."""
        query = sa.select(
            messages.c.turn_id, messages.c.stop_requested, messages.c.followed_elsewhere
        ).where(messages.c.role == "assistant", messages.c.turn_id.in_(turn_ids))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        going = {row.turn_id for row in rows if not row.stop_requested}
        return ReplyFlags(
            stopped=set(turn_ids) - going,
            followed={row.turn_id for row in rows if row.followed_elsewhere},
        )

    async def follow_elsewhere(self, turn_id: str) -> None:
        """Ask the process writing this reply to put its pieces in the durable stream as
        they come, for a reader here."""
        await self._update_reply_in_progress(turn_id, notify="follow", followed_elsewhere=True)

    async def announce_pause(self, seconds: float) -> None:
        """Tell every process that the provider asked for a pause (PostgreSQL only: with
        SQLite there is one process). ``parley.streams.listen`` hears it."""
        if self.engine.dialect.name != "postgresql":
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.select(sa.func.pg_notify(REPLY_REQUESTS_CHANNEL, f"pause {seconds:.3f}"))
            )

    async def request_stop(self, turn_id: str) -> None:
        await self._update_reply_in_progress(turn_id, notify="stop", stop_requested=True)

    async def _update_reply_in_progress(
        self, turn_id: str, *, notify: str | None = None, **values: Any
    ) -> None:
        """Set ``values`` on a turn's reply, if it is still being written. With ``notify``,
        on PostgreSQL, also tell every process ``<notify> <turn id>`` on
        ``REPLY_REQUESTS_CHANNEL``, in the same transaction (so only if the reply is being
        written, and only once it is set)."""
        update = (
            messages.update()
            .where(
                messages.c.turn_id == turn_id,
                messages.c.role == "assistant",
                messages.c.status == "streaming",
            )
            .values(**values)
        )
        async with self.engine.begin() as conn:
            if notify is None or conn.dialect.name != "postgresql":
                await conn.execute(update)
                return
            updated = update.returning(messages.c.turn_id).cte("updated")
            payload = sa.literal(f"{notify} ", sa.Text) + updated.c.turn_id
            notifying = sa.select(sa.func.pg_notify(REPLY_REQUESTS_CHANNEL, payload))
            await conn.execute(notifying.select_from(updated))

    async def finish_reply(
        self, turn_id: str, *, content: str, status: Status, error: str | None = None
    ) -> Message | None:
        """Store a turn's final reply; the stored message, or None if it is gone."""
        sql = self._turn_sql
        values = {
            "b_turn": turn_id,
            "b_now": datetime.now(UTC),
            "b_content": content,
            "b_status": status,
            "b_error": error,
        }
        async with self.engine.begin() as conn:
            # The conversation first, then the message: the order ``begin_turn`` locks them
            # in, so that the two cannot deadlock on PostgreSQL.
            await conn.execute(sql.touch_for_reply, values)
            row = (await conn.execute(sql.finish_reply, values)).one_or_none()
            if row is None:  # finished before (a re-run step), failed as an orphan, or gone
                row = (await conn.execute(sql.reply, values)).one_or_none()
            return None if row is None else _message(row)

    async def message(self, turn_id: str, role: Role) -> Message | None:
        query = sa.select(messages).where(messages.c.turn_id == turn_id, messages.c.role == role)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        return None if row is None else _message(row)

    async def messages(
        self, conversation_id: str, *, limit: int, before: int | None = None
    ) -> list[Message]:
        """Up to ``limit`` messages before id ``before`` (or the latest), oldest first."""
        query = (
            sa.select(messages)
            .where(messages.c.conversation_id == conversation_id)
            .order_by(messages.c.id.desc())
            .limit(limit)
        )
        if before is not None:
            query = query.where(messages.c.id < before)
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(query))
        return [_message(row) for row in reversed(rows)]

    async def branch(
        self,
        owner: str,
        conversation_id: str,
        *,
        limit: int,
        before: int | None = None,
        leaf: int | None = None,
    ) -> Branch:
        """A page of the conversation's branch, oldest first: its latest ``limit``
        messages, or the ``limit`` before message ``before`` (on that message's branch).

        With ``leaf``, the branch is the one through that message, continued to its
        latest descendant (the newest version at each place below it), and it becomes
        the branch the conversation shows. Raises ``ConversationNotFound`` unless the
        conversation is the owner's, ``MessageRefused`` when ``before`` or ``leaf``
        names no message of it.
        """
        async with self.engine.begin() as conn:
            if leaf is not None:
                # Switching branch writes: the conversation is locked first (a write takes
                # SQLite's lock), as a turn locks it, so that the branch's end is read
                # after any turn being stored has committed, and not written over it.
                locked = await conn.execute(
                    conversations.update()
                    .where(conversations.c.id == conversation_id, conversations.c.owner == owner)
                    .values(leaf_id=conversations.c.leaf_id)
                )
                if locked.rowcount == 0:
                    raise ConversationNotFound(conversation_id)
            shown = (
                await conn.execute(
                    sa.select(conversations.c.branched, conversations.c.leaf_id).where(
                        conversations.c.id == conversation_id, conversations.c.owner == owner
                    )
                )
            ).first()
            if shown is None:
                raise ConversationNotFound(conversation_id)
            branched, end = shown
            for field, named in (("before", before), ("leaf", leaf)):
                if named is None:
                    continue
                found = await conn.execute(
                    _MESSAGE_IN, {"b_id": conversation_id, "b_message": named}
                )
                if found.first() is None:
                    raise MessageRefused(
                        "is not a message of this conversation", missing=True, field=field
                    )
            if not branched:
                # One line of messages: read in id order.
                query = (
                    sa.select(messages)
                    .where(messages.c.conversation_id == conversation_id)
                    .order_by(messages.c.id.desc())
                    .limit(limit + 1)
                )
                if before is not None:
                    query = query.where(messages.c.id < before)
                rows = list(await conn.execute(query))
                page = [_message(row) for row in reversed(rows[:limit])]
                return Branch(page, {m.id: [m.id] for m in page}, len(rows) > limit)
            if leaf is not None:
                end = await conn.scalar(_LATEST_BELOW, {"b_message": leaf})
                await conn.execute(
                    conversations.update()
                    .where(conversations.c.id == conversation_id)
                    .values(leaf_id=end)
                )
            if before is not None:
                end = await conn.scalar(
                    sa.select(messages.c.parent_id).where(messages.c.id == before)
                )
            rows = (
                list(await conn.execute(_WALK_UP, {"b_start": end, "b_depth": limit + 1}))
                if end is not None
                else []
            )
            page = [_message(row) for row in rows[-limit:]] if rows else []
            return Branch(page, await _siblings(conn, conversation_id, page), len(rows) > limit)

    async def turn_context(self, turn_id: str, max_messages: int) -> TurnContext | None:
        """What a turn's model step needs (see ``TurnContext``): up to ``max_messages``
        messages of history; None when the turn is gone with its conversation."""
        async with self.engine.connect() as conn:
            found = (await conn.execute(_TURN_SETTINGS, {"b_turn": turn_id})).first()
            if found is None:
                return None
            # The messages before the reply, and a few to spare for failed turns and
            # empty replies, which are left out.
            depth = max_messages + 8
            if found.branched:
                # A reply stored by a release before branches has no parent: it answers
                # the user message of its own turn.
                start = found.parent_id or await conn.scalar(_ASKED_IN_TURN, {"b_turn": turn_id})
                rows = (
                    list(await conn.execute(_WALK_UP_SAID, {"b_start": start, "b_depth": depth}))
                    if start is not None
                    else []
                )
            else:
                # One line of messages: in id order.
                line = {"b_id": found.conversation_id, "b_before": found.id, "b_depth": depth}
                rows = list(await conn.execute(_LINE_BEFORE, line))[::-1]
        earlier = [Said(*row) for row in rows]
        if not earlier or earlier[-1].role != "user":
            return None  # nothing to answer: gone while being read
        return TurnContext(
            prompt=earlier[-1],
            history=_remembered(earlier[:-1])[-(max_messages - 1) :] if max_messages > 1 else [],
            model=found.model,
            system_prompt=found.system_prompt,
        )

    async def history_json(self, conversation_id: str) -> bytes:
        """The example's ``/history`` body: ``[{"content", "isUser"}, ...]``, oldest first,
        without empty replies: the branch the conversation shows.

        Built from bare rows by pydantic-core's serialiser: a conversation can hold many
        thousands of messages, and a model object per message would cost more than the
        query. (PostgreSQL's own ``json_agg`` is slower still, about 2.5 µs a row.)
        """
        async with self.engine.connect() as conn:
            shown = (
                await conn.execute(
                    sa.select(conversations.c.branched, conversations.c.leaf_id).where(
                        conversations.c.id == conversation_id
                    )
                )
            ).first()
            if shown is not None and shown.branched and shown.leaf_id is not None:
                walked = await conn.execute(
                    _WALK_UP, {"b_start": shown.leaf_id, "b_depth": 2**31 - 1}
                )
                rows = [
                    (row.content, row.role)
                    for row in walked
                    if row.role == "user" or row.content != ""
                ]
            else:
                query = (
                    sa.select(messages.c.content, messages.c.role)
                    .where(
                        messages.c.conversation_id == conversation_id,
                        sa.or_(messages.c.role == "user", messages.c.content != ""),
                    )
                    .order_by(messages.c.id)
                )
                rows = [tuple(row) for row in (await conn.execute(query)).all()]
        return pydantic_core.to_json(
            [{"content": content, "isUser": role == "user"} for content, role in rows]
        )

    async def turn(self, turn_id: str) -> Turn | None:
        return await self._turn(self._turn_sql.turn, {"b_turn": turn_id})

    async def keyed_turn(self, owner: str, key_hash: str) -> Turn | None:
        """The turn an idempotency key of ``owner`` named, if its conversation exists."""
        return await self._turn(self._turn_sql.keyed_turn, {"b_owner": owner, "b_key": key_hash})

    async def _turn(self, query: sa.Select[Any], values: dict[str, str]) -> Turn | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(query, values)).one_or_none()
        if row is None:
            return None
        return Turn(
            row.turn_id,
            row.conversation_id,
            row.owner,
            row.content,
            row.status,
            request=getattr(row, "request", None),
        )


_MESSAGE_IN = sa.select(messages.c.id).where(
    messages.c.id == sa.bindparam("b_message"),
    messages.c.conversation_id == sa.bindparam("b_id"),
)


def _walk_up(*columns: sa.ColumnElement[Any]) -> sa.Select[Any]:
    """The branch ending at message ``b_start``: it and up to ``b_depth`` - 1 messages
    before it, oldest first (``columns`` of each, or all). Each step is a primary-key
    lookup of the parent."""
    anchor = sa.select(
        messages.c.id, messages.c.parent_id, sa.literal(1, sa.Integer).label("depth")
    ).where(messages.c.id == sa.bindparam("b_start", type_=messages.c.id.type))
    walk = anchor.cte("walk", recursive=True)
    up = messages.alias("up")
    walk = walk.union_all(
        sa.select(up.c.id, up.c.parent_id, walk.c.depth + 1).where(
            up.c.id == walk.c.parent_id, walk.c.depth < sa.bindparam("b_depth", type_=sa.Integer)
        )
    )
    return (
        sa.select(*(columns or (messages,)))
        .join(walk, messages.c.id == walk.c.id)
        .order_by(walk.c.depth.desc())
    )


_WALK_UP = _walk_up()

# What a turn's step reads (``Store.turn_context``), built once.
_SAID = (messages.c.turn_id, messages.c.role, messages.c.content, messages.c.status)
_REPLY = messages.alias("reply")
_TURN_SETTINGS = (
    sa.select(
        _REPLY.c.id,
        _REPLY.c.parent_id,
        _REPLY.c.conversation_id,
        conversations.c.branched,
        conversations.c.model,
        conversations.c.system_prompt,
    )
    .join(conversations, conversations.c.id == _REPLY.c.conversation_id)
    .where(_REPLY.c.turn_id == sa.bindparam("b_turn"), _REPLY.c.role == "assistant")
)
_ASKED_IN_TURN = sa.select(messages.c.id).where(
    messages.c.turn_id == sa.bindparam("b_turn"), messages.c.role == "user"
)
_WALK_UP_SAID = _walk_up(*_SAID)
_LINE_BEFORE = (
    sa.select(*_SAID)
    .where(
        messages.c.conversation_id == sa.bindparam("b_id"),
        messages.c.id < sa.bindparam("b_before", type_=messages.c.id.type),
    )
    .order_by(messages.c.id.desc())
    .limit(sa.bindparam("b_depth", type_=sa.Integer))
)

# The latest descendant of message ``b_message``: from it, the newest child at each step
# down (a child is always newer than its parent, so the last one reached has the
# highest id).
_LATEST_BELOW = sa.text(
    "WITH RECURSIVE down(id) AS ("
    " SELECT CAST(:b_message AS BIGINT)"
    " UNION ALL"
    " SELECT (SELECT max(child.id) FROM messages AS child WHERE child.parent_id = down.id)"
    " FROM down WHERE down.id IS NOT NULL"
    ") SELECT max(id) FROM down"
)


async def _siblings(
    conn: AsyncConnection, conversation_id: str, page: list[Message]
) -> dict[int, list[int]]:
    """The versions at each message's place on a page: the messages that share its
    parent (for a conversation's first message, the other first messages)."""
    parents = {m.parent_id for m in page if m.parent_id is not None}
    placed = [messages.c.parent_id.in_(parents)] if parents else []
    if any(m.parent_id is None for m in page):
        placed.append(messages.c.parent_id.is_(None))
    if not placed:
        return {}
    rows = await conn.execute(
        sa.select(messages.c.id, messages.c.parent_id)
        .where(messages.c.conversation_id == conversation_id, sa.or_(*placed))
        .order_by(messages.c.id)
    )
    by_parent: dict[int | None, list[int]] = {}
    for message_id, parent_id in rows:
        by_parent.setdefault(parent_id, []).append(message_id)
    return {m.id: by_parent.get(m.parent_id, [m.id]) for m in page}


def _remembered(history: list[Said]) -> list[Said]:
    """What the model is shown of a branch: not the turns that failed (neither the user
    message nor its reply), nor replies stopped before they had any text."""
    kept: list[Said] = []
    for message in history:
        if message.role == "assistant" and message.status == "failed":
            if kept and kept[-1].role == "user":
                kept.pop()
            continue
        if message.role == "assistant" and (not message.content or message.status == "streaming"):
            continue
        kept.append(message)
    return kept


class OwnerGone(Exception):
    """The account was removed after the request was signed in."""


# Accounts' uids, read here without importing ``parley.accounts`` (which imports this).
_users = sa.table("users", sa.column("uid", sa.String()))


async def check_account(conn: AsyncConnection, uid: str) -> None:
    """Refuse to store anything for an account that is gone, inside the transaction that
    stores it: removing a user locks the row first, so a request that signed in just
    before waits for the removal and then sees it."""
    query = sa.select(_users.c.uid).where(_users.c.uid == uid)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    if await conn.scalar(query) is None:
        raise OwnerGone(uid)


async def _check_limits(conn: AsyncConnection, owner: str, limits: TurnLimits) -> None:
    """Refuse a turn beyond the owner's limits, inside the transaction that stores it.

    The rate limiter's row lock comes first: it serialises the owner's turns, so that the
    count of replies being written that follows it is exact.
    """
    from parley.limits import Limited, take

    try:
        await take(conn, f"turns:{owner}", limits.per_minute, 60)
    except Limited as refusal:
        raise TooManyTurns(
            f"At most {limits.per_minute} messages a minute.", refusal.retry_after
        ) from None
    running = await conn.scalar(
        sa.select(sa.func.count())
        .select_from(messages.join(conversations, conversations.c.id == messages.c.conversation_id))
        .where(conversations.c.owner == owner, messages.c.status == "streaming")
    )
    if (running or 0) >= limits.at_once:
        raise TooManyTurns(f"At most {limits.at_once} replies may be written for you at once.", 5)


@dataclass(frozen=True, slots=True)
class Deleted:
    """Conversations just deleted, and the turns whose replies were being written in them
    (they stop: their rows are gone)."""

    conversation_ids: list[str]
    writing: list[str]


async def delete_conversations(conn: AsyncConnection, which: sa.ColumnElement[bool]) -> Deleted:
    """Delete the conversations ``which`` selects, in the caller's transaction.

    What they leave outside these tables (the model's memory, DBOS's records of their
    turns) is written down in the same transaction, for ``parley.deletion`` to remove:
    all or nothing, also across a crash.
    """
    # Locked first, in id order, as every turn locks a conversation before its messages:
    # the deletion cannot deadlock with a turn on PostgreSQL.
    ids = list(
        (
            await conn.execute(
                sa.select(conversations.c.id)
                .where(which)
                .order_by(conversations.c.id)
                .with_for_update()
            )
        ).scalars()
    )
    if not ids:
        return Deleted([], [])
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    chosen = sa.select(conversations.c.id).where(which)
    of_chosen = messages.c.conversation_id.in_(chosen)
    await conn.execute(
        insert(deleted_turns)
        .from_select(
            ["turn_id", "conversation_id"],
            sa.select(messages.c.turn_id, messages.c.conversation_id).where(
                # Every turn has one reply; a regenerated one has no user message.
                of_chosen,
                messages.c.role == "assistant",
            ),
        )
        .on_conflict_do_nothing()
    )
    await conn.execute(
        insert(deleted_conversations)
        .from_select(
            ["conversation_id", "deleted_at"],
            sa.select(
                conversations.c.id, sa.literal(datetime.now(UTC), sa.DateTime(timezone=True))
            ).where(which),
        )
        .on_conflict_do_nothing()
    )
    streaming = list(
        (
            await conn.execute(
                sa.select(messages.c.turn_id).where(of_chosen, messages.c.status == "streaming")
            )
        ).scalars()
    )
    await conn.execute(turn_keys.delete().where(turn_keys.c.conversation_id.in_(chosen)))
    await conn.execute(messages.delete().where(of_chosen))
    await conn.execute(conversations.delete().where(which))
    return Deleted(ids, streaming)


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    # WAL lets history reads run while a turn writes; busy_timeout makes concurrent
    # writers wait for the lock instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Deleted rows are overwritten, not left in the file's free pages: delete means gone.
    cursor.execute("PRAGMA secure_delete=ON")
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
                except sa.exc.DBAPIError:
                    # Another process starting at the same moment may have won the race
                    # (PostgreSQL says so as "already exists" or as a unique violation).
                    won = await conn.scalar(
                        sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                        {"name": name},
                    )
                    if not won:
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
