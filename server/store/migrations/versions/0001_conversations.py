"""Conversations and their messages (a tree: every message has a parent).

Revision ID: 0001_conversations
Revises:
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_conversations"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("title", sa.Text, nullable=False, server_default=""),
        sa.Column("title_source", sa.String(8), nullable=True),
        sa.Column("system", sa.Text, nullable=False, server_default=""),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("active", sa.String(64), nullable=True),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("updated", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("pk", name="pk_conversations"),
        sa.UniqueConstraint("owner", "id", name="uq_conversations_owner_id"),
    )
    op.create_index("ix_conversations_owner_updated", "conversations", ["owner", "updated"])
    op.create_table(
        "messages",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("conversation_pk", sa.Integer, nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("parent_pk", sa.Integer, nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text, nullable=False, server_default=""),
        sa.Column("reasoning", sa.Text, nullable=False, server_default=""),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("finish_reason", sa.String(32), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("usage", sa.Text, nullable=True),
        sa.Column("generation", sa.String(64), nullable=True),
        sa.Column("last_event_id", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("updated", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_messages"),
        sa.ForeignKeyConstraint(
            ["conversation_pk"],
            ["conversations.pk"],
            name="fk_messages_conversation_pk_conversations",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_pk"], ["messages.pk"], name="fk_messages_parent_pk_messages", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("conversation_pk", "id", name="uq_messages_conversation_pk_id"),
    )
    op.create_index("ix_messages_conversation_pk", "messages", ["conversation_pk"])
    op.create_index("ix_messages_status", "messages", ["status"])
    op.create_index("ix_messages_owner", "messages", ["owner"])
    op.create_index("ix_messages_parent_pk", "messages", ["parent_pk"])


def downgrade() -> None:
    op.drop_table("messages")
    op.drop_table("conversations")
