"""The conversation store's tables (SQLAlchemy Core). Migrations create them; this module
is what the queries are written against.

Integer primary keys stay inside the database: the public ids (`id`) are unique per owner
(conversations) or per conversation (messages), so one owner's ids never collide with or
reveal another's."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, ForeignKey, Index, Integer, MetaData, String, Table, Text, UniqueConstraint

# Named constraints, so later migrations can refer to them on both backends.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

conversations = Table(
    "conversations",
    metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("owner", String(200), nullable=False),
    Column("id", String(64), nullable=False),
    Column("title", Text, nullable=False, server_default=""),
    Column("title_source", String(8), nullable=True),  # "user" | "auto"
    Column("system", Text, nullable=False, server_default=""),
    Column("model", String(200), nullable=True),
    Column("active", String(64), nullable=True),  # the leaf message id of the branch shown and sent
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False, server_default="0"),  # its messages' UTF-8 bytes, for quotas
    # How many messages it has (0003_message_counts): an owner's total for the quota is a sum
    # over conversations rather than a count over every message.
    Column("message_count", Integer, nullable=False, server_default="0"),
    UniqueConstraint("owner", "id"),
    Index(None, "owner", "updated"),
)

messages = Table(
    "messages",
    metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("conversation_pk", Integer, ForeignKey("conversations.pk", ondelete="CASCADE"), nullable=False),
    Column("owner", String(200), nullable=False),
    Column("id", String(64), nullable=False),
    Column("parent_pk", Integer, ForeignKey("messages.pk", ondelete="CASCADE"), nullable=True),
    Column("role", String(16), nullable=False),
    Column("content", Text, nullable=False, server_default=""),
    Column("reasoning", Text, nullable=False, server_default=""),
    Column("status", String(16), nullable=False),
    Column("model", String(200), nullable=True),
    Column("finish_reason", String(32), nullable=True),
    Column("error", Text, nullable=True),  # JSON
    Column("usage", Text, nullable=True),  # JSON
    Column("generation", String(64), nullable=True),
    Column("last_event_id", Integer, nullable=False, server_default="0"),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    UniqueConstraint("conversation_pk", "id"),
    Index(None, "conversation_pk"),
    Index(None, "status"),  # start-up recovery: streaming -> interrupted
    Index(None, "owner"),  # quotas and "delete all my data" count one owner's messages
    Index(None, "parent_pk"),  # cascading deletes and branch lookups follow parent links
)
