"""Search, and where an imported conversation came from.

``conversations.imported_from`` names an imported conversation's source, unique per
owner: importing the same file again finds it and makes no copy.

The index is written by triggers on ``messages``, so it changes in the transaction that
changes a message (a turn's user message, its reply when it is finished or stopped, an
import, a deletion), whichever release or code path made the change.

Each entry carries its conversation's owner, so a search reads only the caller's entries
rather than everyone's matches filtered afterwards.

- SQLite: an FTS5 table. Words are case-folded and stripped of accents (``unicode61
  remove_diacritics 2``), with prefix indexes for the last word typed. The owner is an
  indexed column holding one token (``o`` and the owner's bytes in hex), which a query
  ANDs with its words.
- PostgreSQL: a ``tsvector`` per message in ``message_search``, in one GIN index with
  its owner (``btree_gin``). The ``parley_search`` configuration is ``simple`` (no
  stemming, no stop words: messages come in any language) behind ``unaccent``, given the
  message's runs of letters and digits. Only the first 100,000 characters of a message
  are indexed, as a tsvector is limited to 1 MB.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE_ENTRY = (
    "INSERT INTO message_search (rowid, body, owner)"
    " SELECT NEW.id, NEW.content, 'o' || hex(owner) FROM conversations"
    " WHERE id = NEW.conversation_id"
)

_SQLITE = [
    "CREATE VIRTUAL TABLE message_search USING fts5("
    "body, owner, tokenize = 'unicode61 remove_diacritics 2', prefix = '2 3')",
    # The owner column weighs nothing in the ranking: every entry of the caller has it.
    "INSERT INTO message_search (message_search, rank) VALUES ('rank', 'bm25(1.0, 0.0)')",
    "INSERT INTO message_search (rowid, body, owner)"
    " SELECT messages.id, messages.content, 'o' || hex(conversations.owner)"
    " FROM messages JOIN conversations ON conversations.id = messages.conversation_id"
    " WHERE messages.content <> ''",
    f"CREATE TRIGGER message_search_insert AFTER INSERT ON messages"
    f" WHEN NEW.content <> '' BEGIN {_SQLITE_ENTRY}; END",
    f"CREATE TRIGGER message_search_update AFTER UPDATE OF content ON messages"
    f" WHEN OLD.content IS NOT NEW.content BEGIN"
    f" DELETE FROM message_search WHERE rowid = OLD.id;"
    f" {_SQLITE_ENTRY} AND NEW.content <> ''; END",
    "CREATE TRIGGER message_search_delete AFTER DELETE ON messages BEGIN"
    " DELETE FROM message_search WHERE rowid = OLD.id; END",
]

_POSTGRES = [
    "CREATE EXTENSION IF NOT EXISTS unaccent",
    "CREATE EXTENSION IF NOT EXISTS btree_gin",
    "CREATE TEXT SEARCH CONFIGURATION parley_search (COPY = simple)",
    "ALTER TEXT SEARCH CONFIGURATION parley_search ALTER MAPPING FOR"
    " word, hword, hword_part, numword, numhword, hword_numpart WITH unaccent, simple",
    "CREATE TABLE message_search ("
    " message_id BIGINT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,"
    " owner VARCHAR(64) NOT NULL,"
    " document TSVECTOR NOT NULL)",
    "CREATE INDEX ix_message_search ON message_search USING gin (owner, document)",
    # Words as the query takes them and as SQLite's index has them: runs of letters and
    # digits. (PostgreSQL's parser would keep "room-101" as "room" and "-101", and
    # "example.com" whole, where a query's words are "room", "101", "example", "com".)
    "CREATE FUNCTION parley_search_words(text) RETURNS text LANGUAGE sql IMMUTABLE"
    r" PARALLEL SAFE AS $$ SELECT regexp_replace(left($1, 100000), '[\W_]+', ' ', 'g') $$",
    """CREATE FUNCTION parley_index_message() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.content = '' THEN
        DELETE FROM message_search WHERE message_id = NEW.id;
    ELSE
        INSERT INTO message_search (message_id, owner, document)
        SELECT NEW.id, owner, to_tsvector('parley_search', parley_search_words(NEW.content))
        FROM conversations WHERE id = NEW.conversation_id
        ON CONFLICT (message_id) DO UPDATE SET document = EXCLUDED.document;
    END IF;
    RETURN NULL;
END
$$""",
    "CREATE TRIGGER message_search_insert AFTER INSERT ON messages FOR EACH ROW"
    " WHEN (NEW.content <> '') EXECUTE FUNCTION parley_index_message()",
    "CREATE TRIGGER message_search_update AFTER UPDATE OF content ON messages FOR EACH ROW"
    " WHEN (OLD.content IS DISTINCT FROM NEW.content) EXECUTE FUNCTION parley_index_message()",
    "INSERT INTO message_search (message_id, owner, document)"
    " SELECT messages.id, conversations.owner,"
    " to_tsvector('parley_search', parley_search_words(messages.content))"
    " FROM messages JOIN conversations ON conversations.id = messages.conversation_id"
    " WHERE messages.content <> ''",
]


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("imported_from", sa.String(80), nullable=True))
    # An index rather than a constraint: SQLite would copy the table to add one.
    op.create_index(
        "uq_conversations_imported_from", "conversations", ["owner", "imported_from"], unique=True
    )
    # An export pages through an owner's conversations in id order.
    op.create_index("ix_conversations_owner_id", "conversations", ["owner", "id"])
    for statement in _POSTGRES if op.get_bind().dialect.name == "postgresql" else _SQLITE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER message_search_update ON messages")
        op.execute("DROP TRIGGER message_search_insert ON messages")
        op.execute("DROP FUNCTION parley_index_message()")
        op.execute("DROP FUNCTION parley_search_words(text)")
        op.execute("DROP TABLE message_search")
        op.execute("DROP TEXT SEARCH CONFIGURATION parley_search")
    else:
        for trigger in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER message_search_{trigger}")
        op.execute("DROP TABLE message_search")
    op.drop_index("uq_conversations_imported_from", "conversations")
    op.drop_index("ix_conversations_owner_id", "conversations")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("imported_from")
