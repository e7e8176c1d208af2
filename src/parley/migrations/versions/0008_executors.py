"""The processes of a Parley service, each with a heartbeat (``parley.cluster``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "executors",
        sa.Column("executor_id", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        # Seconds since the epoch, by the database's clock: replicas' clocks never meet.
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_executors_heartbeat_at", "executors", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_executors_heartbeat_at", "executors")
    op.drop_table("executors")
