"""Search over conversation titles and message texts.

SQLite: FTS5 indexes kept in sync by triggers, so no write path can forget them (a
conversation's delete cascades to its messages, whose delete triggers empty the index).
For each of messages.content and conversations.title: a trigram index (substrings of 3+
characters, any script; external content, so it stores no second copy of the text) and a
unicode61 index over `rill_search_text(text)` for 1-2 character queries, where each CJK
character or emoji is a token of its own (server/store/fts.py).

PostgreSQL: search is ILIKE; pg_trgm GIN indexes make it an index search when the
extension can be created (it is a trusted extension since PostgreSQL 13), and search
stays correct, only slower, without them.

Revision ID: 0002_search
Revises: 0001_conversations
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from server.store import fts

revision: str = "0002_search"
down_revision: str | None = "0001_conversations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger(__name__)

# (index prefix, table, column): messages.content and conversations.title.
SOURCES = (("search_messages", "messages", "content"), ("search_titles", "conversations", "title"))
SHORT_TOKENIZER = "unicode61 remove_diacritics 0"  # trigram keeps diacritics too: one meaning of a match
TRGM_INDEXES = (
    ("ix_messages_content_trgm", "messages", "content"),
    ("ix_conversations_title_trgm", "conversations", "title"),
)


def _sqlite_statements(name: str, table: str, column: str) -> list[str]:
    short = f"{name}_short"
    index_new = (
        f"INSERT INTO {name}(rowid, {column}) VALUES (new.pk, new.{column}); "
        f"INSERT INTO {short}(rowid, {column}) VALUES (new.pk, {fts.FUNCTION}(new.{column}));"
    )
    unindex_old = (
        f"INSERT INTO {name}({name}, rowid, {column}) VALUES ('delete', old.pk, old.{column}); "
        f"INSERT INTO {short}({short}, rowid, {column}) VALUES ('delete', old.pk, {fts.FUNCTION}(old.{column}));"
    )
    return [
        f"CREATE VIRTUAL TABLE {name} USING fts5({column}, tokenize='trigram', content='{table}', content_rowid='pk')",
        # Contentless: the text it indexes is derived, and snippets come from the table itself.
        # prefix='1 2': a 1-2 letter Latin query (a word's start) is one index lookup.
        f"CREATE VIRTUAL TABLE {short} USING fts5({column}, tokenize='{SHORT_TOKENIZER}', prefix='1 2', content='')",
        f"CREATE TRIGGER {name}_insert AFTER INSERT ON {table} BEGIN {index_new} END",
        f"CREATE TRIGGER {name}_delete AFTER DELETE ON {table} BEGIN {unindex_old} END",
        # Only when the text changes: the answer writer's flushes also update status and usage.
        f"CREATE TRIGGER {name}_update AFTER UPDATE OF {column} ON {table} "
        f"WHEN old.{column} IS NOT new.{column} BEGIN {unindex_old} {index_new} END",
        # What is already stored (a database from 0001 with conversations in it).
        f"INSERT INTO {name}({name}) VALUES ('rebuild')",
        f"INSERT INTO {short}(rowid, {column}) SELECT pk, {fts.FUNCTION}({column}) FROM {table}",
    ]


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        fts.register(bind.connection.dbapi_connection)  # the backfill calls it
        for source in SOURCES:
            for statement in _sqlite_statements(*source):
                op.execute(statement)
        return
    try:
        # A savepoint: a refused CREATE EXTENSION must not abort the migration's transaction.
        with bind.begin_nested():
            bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except sa.exc.DBAPIError as error:
        log.warning("pg_trgm unavailable (%s): search works without its index, scanning", type(error).__name__)
        return
    for index, table, column in TRGM_INDEXES:
        op.execute(f"CREATE INDEX {index} ON {table} USING gin ({column} gin_trgm_ops)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name, _table, _column in SOURCES:
            for suffix in ("insert", "delete", "update"):
                op.execute(f"DROP TRIGGER IF EXISTS {name}_{suffix}")
            op.execute(f"DROP TABLE IF EXISTS {name}_short")
            op.execute(f"DROP TABLE IF EXISTS {name}")
        return
    # The extension stays: it may predate Rill or serve other databases' objects.
    for index, _table, _column in TRGM_INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {index}")
