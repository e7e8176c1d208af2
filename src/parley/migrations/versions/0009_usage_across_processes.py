"""The page's usage figures across processes: ``usage_samples`` (``parley.usage``).

Every Parley process sharing the database writes one row every few seconds, with what it
measured since its previous row, so that any of them can show the whole service's CPU and
wall-clock time. Rows older than the page's history are deleted as new ones come.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_samples",
        sa.Column("process_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        # Seconds since the epoch, by the database's clock: replicas' clocks never meet.
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("cpu_time", sa.Float(), nullable=False),
        sa.Column("model_cpu_time", sa.Float(), nullable=True),
        sa.Column("wall_clock_time", sa.Float(), nullable=False),
        sa.Column("turns", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("process_id", "seq"),
    )
    op.create_index("ix_usage_samples_at", "usage_samples", ["at"])


def downgrade() -> None:
    op.drop_index("ix_usage_samples_at", "usage_samples")
    op.drop_table("usage_samples")
