"""Branches, and a model and instructions per conversation.

Every message points at the one before it on its branch (``parent_id``): a reply at its
user message, a user message at the reply it follows (none for a conversation's first).
Editing a message or regenerating a reply adds a sibling, a message with the same
parent. A conversation remembers the end of the branch it shows (``leaf_id``), and
whether it has any branch at all (``branched``), so that a conversation without one is
read as before, in id order. Until now every conversation was one line of messages, so
each message's parent is the message before it, and its leaf its latest message.

An idempotency key also remembers what it asked for (``request``), now that a turn can
be a new message, an edit or a regenerated reply.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("parent_id", _ID, nullable=True))
    op.create_index("ix_messages_parent", "messages", ["parent_id", "conversation_id"])
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("leaf_id", _ID, nullable=True))
        batch.add_column(
            sa.Column("branched", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("model", sa.String(64), nullable=True))
        batch.add_column(sa.Column("system_prompt", sa.Text(), nullable=True))
    with op.batch_alter_table("turn_keys") as batch:
        batch.add_column(sa.Column("request", sa.String(64), nullable=True))
    op.execute(
        "UPDATE messages SET parent_id = (SELECT max(earlier.id) FROM messages AS earlier"
        " WHERE earlier.conversation_id = messages.conversation_id"
        " AND earlier.id < messages.id)"
    )
    op.execute(
        "UPDATE conversations SET leaf_id = (SELECT max(messages.id) FROM messages"
        " WHERE messages.conversation_id = conversations.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("turn_keys") as batch:
        batch.drop_column("request")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("system_prompt")
        batch.drop_column("model")
        batch.drop_column("branched")
        batch.drop_column("leaf_id")
    op.drop_index("ix_messages_parent", "messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("parent_id")
