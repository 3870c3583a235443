"""Shared by the store's tests: limits, and a dump of every row to compare before/after."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from server.store import Store, StoreLimits
from server.store.schema import conversations, messages

LIMITS = StoreLimits(max_conversations=50, max_messages=500, max_bytes=1_000_000, max_message_chars=10_000)


async def dump(store: Store) -> list[list[tuple[Any, ...]]]:
    """Every row of every table, in key order: "nothing changed" means this is equal."""

    def rows(connection: Connection) -> list[list[tuple[Any, ...]]]:
        return [
            [tuple(row) for row in connection.execute(select(table).order_by(table.c.pk))]
            for table in (conversations, messages)
        ]

    return await store.database.read(rows)


def user(content: str, parent: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"role": "user", "content": content, "parent": parent, **fields}


def assistant(content: str, parent: str, **fields: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "parent": parent, **fields}
