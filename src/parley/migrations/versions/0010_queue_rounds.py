"""Fair queueing between users: the round each queued turn's reply holds.

A reply written while the provider's limits are set gets a round (``parley.pacing``);
the partial index holds only replies still being written, so finding the lowest round
and a user's highest stays cheap however long the history.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNFINISHED = "status = 'streaming' AND queue_round IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("queue_round", sa.Integer(), nullable=True))
    op.create_index(
        "ix_messages_queue_round",
        "messages",
        ["queue_round"],
        sqlite_where=sa.text(_UNFINISHED),
        postgresql_where=sa.text(_UNFINISHED),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_queue_round", "messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("queue_round")
