"""Streaming replies: reply status and errors, stop requests, epochs, conversation activity.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("stop_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        # How many times the model step started for this turn: the epoch of its events.
        batch.add_column(sa.Column("epochs", sa.Integer(), nullable=False, server_default="0"))
    # At most one reply being written per conversation: two turns at once would interleave
    # in the model's memory.
    op.create_index(
        "uq_messages_one_streaming",
        "messages",
        ["conversation_id"],
        unique=True,
        sqlite_where=sa.text("status = 'streaming'"),
        postgresql_where=sa.text("status = 'streaming'"),
    )
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE conversations SET updated_at = created_at")
    with op.batch_alter_table("conversations") as batch:
        batch.alter_column("updated_at", nullable=False)
    op.create_index("ix_conversations_owner_updated", "conversations", ["owner", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_conversations_owner_updated", "conversations")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("updated_at")
    op.drop_index("uq_messages_one_streaming", "messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("epochs")
        batch.drop_column("stop_requested")
        batch.drop_column("error")
