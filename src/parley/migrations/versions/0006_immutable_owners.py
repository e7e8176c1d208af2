"""Accounts own their data by an immutable id; idempotency keys and deletions get tables.

- ``users.uid``: a random id that is never reused. In accounts mode a conversation's
  ``owner`` is this id, so a new account that takes a removed one's name inherits nothing.
  Existing accounts-mode conversations move from the name to the id.
- ``users.chat_conversation_id``: the conversation the example's API (``/chat``,
  ``/history``) uses for the account. Existing accounts keep the one derived from their
  name, so their history stays where it was; new accounts get a random one.
- ``turn_keys``: which turn an ``Idempotency-Key`` named. Turn ids are random now, and a
  key lives only as long as its conversation.
- ``deleted_conversations`` and ``deleted_turns``: what a deletion still has to remove
  from the model's memory and from DBOS's tables, written in the deleting transaction.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# parley.store's namespace for the example's conversations, as it was when this ran.
_SEED_NAMESPACE = uuid.UUID("5b0d5f5e-3f0c-4d8e-9a51-6a2f0c7d2e11")


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("uid", sa.String(36), nullable=True))
        batch.add_column(sa.Column("chat_conversation_id", sa.String(36), nullable=True))
    conn = op.get_bind()
    users = sa.table(
        "users",
        sa.column("id", sa.Integer()),
        sa.column("username", sa.String()),
        sa.column("uid", sa.String()),
        sa.column("chat_conversation_id", sa.String()),
    )
    conversations = sa.table("conversations", sa.column("owner", sa.String()))
    for user_id, username in conn.execute(sa.select(users.c.id, users.c.username)).all():
        uid = str(uuid.uuid4())
        conn.execute(
            users.update()
            .where(users.c.id == user_id)
            .values(uid=uid, chat_conversation_id=str(uuid.uuid5(_SEED_NAMESPACE, username)))
        )
        conn.execute(
            conversations.update().where(conversations.c.owner == username).values(owner=uid)
        )
    with op.batch_alter_table("users") as batch:
        batch.alter_column("uid", existing_type=sa.String(36), nullable=False)
        batch.alter_column("chat_conversation_id", existing_type=sa.String(36), nullable=False)
        batch.create_unique_constraint("uq_users_uid", ["uid"])

    op.create_table(
        "turn_keys",
        sa.Column("owner", sa.String(64), nullable=False),
        # SHA-256 of the key: any length and character comes out the same size.
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("turn_id", sa.String(128), nullable=False),
        sa.Column(
            "conversation_id",
            sa.String(36),
            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("owner", "key_hash"),
    )
    op.create_index("ix_turn_keys_conversation", "turn_keys", ["conversation_id"])
    op.create_table(
        "deleted_conversations",
        sa.Column("conversation_id", sa.String(36), primary_key=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "deleted_turns",
        sa.Column("turn_id", sa.String(128), primary_key=True),
        sa.Column("conversation_id", sa.String(36), nullable=False),
    )
    op.create_index("ix_deleted_turns_conversation", "deleted_turns", ["conversation_id"])


def downgrade() -> None:
    op.drop_index("ix_deleted_turns_conversation", table_name="deleted_turns")
    op.drop_table("deleted_turns")
    op.drop_table("deleted_conversations")
    op.drop_index("ix_turn_keys_conversation", table_name="turn_keys")
    op.drop_table("turn_keys")
    users = sa.table("users", sa.column("username", sa.String()), sa.column("uid", sa.String()))
    conversations = sa.table("conversations", sa.column("owner", sa.String()))
    op.get_bind().execute(
        conversations.update()
        .where(conversations.c.owner == users.c.uid)
        .values(owner=users.c.username)
    )
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint("uq_users_uid", type_="unique")
        batch.drop_column("chat_conversation_id")
        batch.drop_column("uid")
