"""Alembic environment: runs Parley's migrations on a synchronous connection."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from parley.store import metadata

# Any fixed number: replicas starting together take turns at migrating.
_MIGRATION_LOCK_ID = 7_305_214_881


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        is_postgres = connection.dialect.name == "postgresql"
        if is_postgres:
            connection.execute(sa.text("SELECT pg_advisory_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            connection.commit()
        try:
            context.configure(
                connection=connection,
                target_metadata=metadata,
                render_as_batch=not is_postgres,
            )
            with context.begin_transaction():
                context.run_migrations()
        finally:
            if is_postgres:
                connection.execute(
                    sa.text("SELECT pg_advisory_unlock(:id)"), {"id": _MIGRATION_LOCK_ID}
                )
                connection.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("Parley's migrations run online only: use `parley migrate`.")
run_migrations_online()
