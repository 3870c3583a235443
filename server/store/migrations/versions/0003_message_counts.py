"""Each conversation's message count, so the per-owner message quota is a sum over the
owner's conversations rather than a count over every message (an add_message with
200,000 stored messages spent most of its time counting them).

Revision ID: 0003_message_counts
Revises: 0002_search
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_message_counts"
down_revision: str | None = "0002_search"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("conversations", sa.Column("message_count", sa.Integer, nullable=False, server_default="0"))
    # What is already stored.
    op.execute(
        "UPDATE conversations SET message_count = "
        "(SELECT count(*) FROM messages WHERE messages.conversation_pk = conversations.pk)"
    )


def downgrade() -> None:
    # Not a batch (copy and drop the table): dropping `conversations` with foreign keys on
    # would cascade to every message. SQLite drops a column itself since 3.35.
    op.execute("ALTER TABLE conversations DROP COLUMN message_count")
