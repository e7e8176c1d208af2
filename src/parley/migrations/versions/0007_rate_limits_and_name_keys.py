"""Rate limits in the database, and one account per name whatever its case or spelling.

- ``rate_limits``: the counters of ``parley.limits`` (failed sign-ins per account and per
  address, sign-ups per address, ...), shared by every replica.
- ``users.username_key``: the name NFKC-normalised and case-folded, unique, so that
  "Carol" and "carol", or an NFC and an NFD "josé", are one account. Existing accounts
  get theirs here. Where two existing names share a key, the older account (lower id)
  keeps it and the later one gets the key with "/<id>" added, which no name can have
  now that names may not contain "/"; that account still signs in by its exact name.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

import unicodedata
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_MAX_CHARS = 255


def username_key(name: str) -> str:
    """``parley.accounts.username_key`` as it was when this ran."""
    return unicodedata.normalize("NFKC", name).casefold()


def upgrade() -> None:
    op.create_table(
        "rate_limits",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
    )

    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("username_key", sa.String(KEY_MAX_CHARS), nullable=True))
    conn = op.get_bind()
    users = sa.table(
        "users",
        sa.column("id", sa.Integer()),
        sa.column("username", sa.String()),
        sa.column("username_key", sa.String()),
    )
    taken: set[str] = set()
    rows = conn.execute(sa.select(users.c.id, users.c.username).order_by(users.c.id)).all()
    for user_id, username in rows:
        key = username_key(username)
        if key in taken or len(key) > KEY_MAX_CHARS:
            key = f"{key[: KEY_MAX_CHARS - 24]}/{user_id}"
            while key in taken:  # only if an old name ended the same way
                key += "/"
        taken.add(key)
        conn.execute(users.update().where(users.c.id == user_id).values(username_key=key))
    with op.batch_alter_table("users") as batch:
        batch.alter_column("username_key", existing_type=sa.String(KEY_MAX_CHARS), nullable=False)
        batch.create_index("uq_users_username_key", ["username_key"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_index("uq_users_username_key")
        batch.drop_column("username_key")
    op.drop_table("rate_limits")
