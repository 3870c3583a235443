"""Per-owner limits: how much one owner stores, and the refusals when a write would pass
a limit. Only writes that add are refused: reads, deletes and an accepted answer's
saves always go through."""

from __future__ import annotations

from sqlalchemy import bindparam, func, select
from sqlalchemy.engine import Connection

from server.http.errors import ApiError

from .schema import conversations
from .validation import StoreLimits

_TOTALS = select(
    func.count(),
    func.coalesce(func.sum(conversations.c.message_count), 0),
    func.coalesce(func.sum(conversations.c.bytes), 0),
).where(conversations.c.owner == bindparam("owner"))


def totals(connection: Connection, owner: str) -> dict[str, int]:
    row = connection.execute(_TOTALS, {"owner": owner}).one()
    return {"conversations": int(row[0]), "messages": int(row[1]), "bytes": int(row[2])}


def usage(totals: dict[str, int], limits: StoreLimits) -> dict[str, int]:
    return totals | {
        "max_conversations": limits.max_conversations,
        "max_messages": limits.max_messages,
        "max_bytes": limits.max_bytes,
        "max_message_chars": limits.max_message_chars,
    }


def check_conversations(connection: Connection, owner: str, limits: StoreLimits, adding: int) -> None:
    count = (connection.execute(select(func.count()).where(conversations.c.owner == owner))).scalar_one()
    refuse_conversations(count, limits, adding)


def refuse_conversations(count: int, limits: StoreLimits, adding: int) -> None:
    if count + adding > limits.max_conversations:
        raise ApiError(
            409,
            "quota_conversations",
            f"You have reached the limit of {limits.max_conversations} conversations: delete some to start new ones.",
        )


def check_messages(connection: Connection, owner: str, limits: StoreLimits, adding: int, adding_bytes: int) -> None:
    refuse_messages(totals(connection, owner), limits, adding, adding_bytes)


def refuse_messages(have: dict[str, int], limits: StoreLimits, adding: int, adding_bytes: int) -> None:
    """quota_messages / quota_bytes when adding this much to an owner's totals would pass a limit."""
    if have["messages"] + adding > limits.max_messages:
        raise ApiError(
            409,
            "quota_messages",
            f"You have reached the limit of {limits.max_messages} messages: delete some conversations to add more.",
        )
    if have["bytes"] + adding_bytes > limits.max_bytes:
        raise ApiError(
            413,
            "quota_bytes",
            f"Your conversations have reached the storage limit of {limits.max_bytes} bytes: delete some to add more.",
        )
