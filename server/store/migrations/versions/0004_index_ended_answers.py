"""SQLite: a message enters the search index when it is complete, not at every save of an
answer still streaming. 0002's triggers re-indexed an answer's whole text (in both FTS5
indexes) each time the writer saved it, every save_interval: most of the database's work
for a stored answer. Now rows whose status is `streaming` are left out of the index; the
write that ends an answer (or marks it interrupted at start-up) indexes its text once, and
Continue takes it out again until it ends anew. Search finds an answer once it has ended.

PostgreSQL searches the tables themselves (ILIKE): nothing changes there.

Revision ID: 0004_index_ended_answers
Revises: 0003_message_counts
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from server.store import fts

revision: str = "0004_index_ended_answers"
down_revision: str | None = "0003_message_counts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME, SHORT = "search_messages", "search_messages_short"
TRIGGERS = ("insert", "delete", "update")


def _index(row: str, where: str = "") -> str:
    """The statements that add `row` (new or old) to both indexes (optionally only WHERE)."""
    return (
        f"INSERT INTO {NAME}(rowid, content) SELECT {row}.pk, {row}.content {where}; "
        f"INSERT INTO {SHORT}(rowid, content) SELECT {row}.pk, {fts.FUNCTION}({row}.content) {where};"
    )


def _unindex(row: str, where: str = "") -> str:
    # External-content and contentless FTS5 tables are told exactly what was indexed.
    return (
        f"INSERT INTO {NAME}({NAME}, rowid, content) SELECT 'delete', {row}.pk, {row}.content {where}; "
        f"INSERT INTO {SHORT}({SHORT}, rowid, content) "
        f"SELECT 'delete', {row}.pk, {fts.FUNCTION}({row}.content) {where};"
    )


def _drop_triggers() -> None:
    for suffix in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {NAME}_{suffix}")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    fts.register(bind.connection.dbapi_connection)  # the statements below call it
    _drop_triggers()
    # What 0002 indexed of answers still streaming (cut short by a crash before this start).
    op.execute(
        f"INSERT INTO {NAME}({NAME}, rowid, content) SELECT 'delete', pk, content FROM messages "
        "WHERE status = 'streaming'"
    )
    op.execute(
        f"INSERT INTO {SHORT}({SHORT}, rowid, content) SELECT 'delete', pk, {fts.FUNCTION}(content) FROM messages "
        "WHERE status = 'streaming'"
    )
    op.execute(
        f"CREATE TRIGGER {NAME}_insert AFTER INSERT ON messages WHEN new.status != 'streaming' "
        f"BEGIN {_index('new')} END"
    )
    op.execute(
        f"CREATE TRIGGER {NAME}_delete AFTER DELETE ON messages WHEN old.status != 'streaming' "
        f"BEGIN {_unindex('old')} END"
    )
    # Only when the text changes or the row goes in or out of the index: a streaming
    # answer's saves and the endings' status and usage updates cost no indexing.
    unindex_old = _unindex("old", "WHERE old.status != 'streaming'")
    index_new = _index("new", "WHERE new.status != 'streaming'")
    op.execute(
        f"CREATE TRIGGER {NAME}_update AFTER UPDATE OF content, status ON messages "
        "WHEN (old.content IS NOT new.content AND new.status != 'streaming') "
        "OR (old.status = 'streaming') != (new.status = 'streaming') "
        f"BEGIN {unindex_old} {index_new} END"
    )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    fts.register(bind.connection.dbapi_connection)
    _drop_triggers()
    # 0002's triggers, which index every row whatever its status.
    op.execute(f"CREATE TRIGGER {NAME}_insert AFTER INSERT ON messages BEGIN {_index('new')} END")
    op.execute(f"CREATE TRIGGER {NAME}_delete AFTER DELETE ON messages BEGIN {_unindex('old')} END")
    op.execute(
        f"CREATE TRIGGER {NAME}_update AFTER UPDATE OF content ON messages "
        f"WHEN old.content IS NOT new.content BEGIN {_unindex('old')} {_index('new')} END"
    )
    op.execute(f"INSERT INTO {NAME}(rowid, content) SELECT pk, content FROM messages WHERE status = 'streaming'")
    op.execute(
        f"INSERT INTO {SHORT}(rowid, content) SELECT pk, {fts.FUNCTION}(content) FROM messages "
        "WHERE status = 'streaming'"
    )
