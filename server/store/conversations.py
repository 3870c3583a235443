"""Queries on one owner's conversations: find, list, create, change, delete, count."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, case, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from . import shapes, validation
from .errors import bad_message, not_found
from .quotas import refuse_conversations, totals
from .schema import conversations, messages
from .validation import StoreLimits

# Built once: building a statement (and its cache key) costs more CPU than running it.
_FIND = select(conversations.c.pk).where(
    conversations.c.owner == bindparam("owner"), conversations.c.id == bindparam("cid")
)
_FIND_FOR_UPDATE = _FIND.with_for_update()
_SUMMARY = shapes.summary_select().where(conversations.c.pk == bindparam("pk"))
_LIST = (
    shapes.summary_select()
    .where(conversations.c.owner == bindparam("owner"))
    .order_by(conversations.c.updated.desc(), conversations.c.pk.desc())
    .limit(bindparam("limit"))
)
_LIST_BEFORE = _LIST.where(conversations.c.updated < bindparam("before"))


def find_pk(connection: Connection, owner: str, cid: str, *, lock: bool = False) -> int | None:
    """lock: for writers. Every write transaction locks the conversation's row before any
    of its messages (PostgreSQL; SQLite has one writer), the order a delete's cascade
    takes, so a delete and an answer's save never deadlock."""
    result = connection.execute(_FIND_FOR_UPDATE if lock else _FIND, {"owner": owner, "cid": cid})
    return result.scalar_one_or_none()


def require_pk(connection: Connection, owner: str, cid: Any, *, lock: bool = False) -> int:
    """The conversation's key, or 404 (also for another owner's id and malformed ids)."""
    if not isinstance(cid, str) or not validation.ID.fullmatch(cid):
        raise not_found()
    pk = find_pk(connection, owner, cid, lock=lock)
    if pk is None:
        raise not_found()
    return pk


def summary(connection: Connection, pk: int) -> dict[str, Any]:
    return shapes.summary(connection.execute(_SUMMARY, {"pk": pk}).one())


def list_summaries(connection: Connection, owner: str, limit: int, before: int | None) -> list[dict[str, Any]]:
    query, values = (_LIST, {}) if before is None else (_LIST_BEFORE, {"before": before})
    rows = connection.execute(query, {"owner": owner, "limit": limit, **values}).all()
    return [shapes.summary(row) for row in rows]


# Built once (building a statement costs more CPU than running it); values bound at execute.
_CREATE = insert(conversations).returning(
    conversations.c.pk, *(conversations.c[name] for name in shapes.CONVERSATION_FIELDS)
)
# The owner's totals (for the quotas) and this id's row, if any, in one statement.
_TOTALS_AND_FIND = select(
    func.count(),
    func.max(case((conversations.c.id == bindparam("cid"), conversations.c.pk))),
    func.coalesce(func.sum(conversations.c.message_count), 0),
    func.coalesce(func.sum(conversations.c.bytes), 0),
).where(conversations.c.owner == bindparam("owner"))

CREATE_KEYS = frozenset({"id", "title", "title_source", "system", "model"})


def create(connection: Connection, owner: str, data: Any, limits: StoreLimits, now: int) -> tuple[dict[str, Any], bool]:
    fields = new_fields(data, limits)
    have, existing = owner_totals(connection, owner, fields["id"])
    if existing is not None:
        return summary(connection, existing), False
    refuse_conversations(have["conversations"], limits, 1)
    return insert_new(connection, owner, fields, now)[1], True


def owner_totals(connection: Connection, owner: str, cid: str) -> tuple[dict[str, int], int | None]:
    """The owner's totals (for the quotas) and conversation `cid`'s key if it exists, in
    one statement (a new conversation, alone or with its first message)."""
    count, existing, message_total, byte_total = connection.execute(
        _TOTALS_AND_FIND, {"owner": owner, "cid": cid}
    ).one()
    totals = {"conversations": int(count), "messages": int(message_total), "bytes": int(byte_total)}
    return totals, None if existing is None else int(existing)


def new_fields(data: Any, limits: StoreLimits) -> dict[str, Any]:
    """A new conversation's fields, checked (a new id when it has none)."""
    if not isinstance(data, dict):
        raise bad_message("A conversation must be an object.")
    unknown = set(data) - CREATE_KEYS
    if unknown:
        raise bad_message(f"Unknown conversation field {sorted(unknown)[0]!r}.")
    cid = validation.valid_id(data["id"], "conversation id") if data.get("id") is not None else validation.new_id()
    title = validation.title(data.get("title", ""))
    source = validation.title_source(data.get("title_source", "user" if title else None))
    system = validation.text(data.get("system", ""), "system", limits.max_message_chars)
    model = validation.model(data.get("model"))
    return {"id": cid, "title": title, "title_source": source, "system": system, "model": model, "active": None}


def insert_new(connection: Connection, owner: str, fields: dict[str, Any], now: int) -> tuple[int, dict[str, Any]]:
    """(key, summary) of the conversation inserted with `fields` (from new_fields; also
    `bytes` and `message_count` when it is made with messages)."""
    values = {"owner": owner, "created": now, "updated": now, "bytes": 0, "message_count": 0} | fields
    pk, *row = connection.execute(_CREATE, values).one()
    return int(pk), dict(zip(shapes.CONVERSATION_FIELDS, row, strict=True)) | {"streaming": False}


def insert_row(connection: Connection, owner: str, fields: dict[str, Any], created: int, updated: int) -> int:
    result = connection.execute(
        insert(conversations)
        .values(owner=owner, created=created, updated=updated, bytes=0, **fields)
        .returning(conversations.c.pk)
    )
    return int(result.scalar_one())


UPDATE_KEYS = frozenset({"title", "title_source", "system", "model", "active"})


def change(
    connection: Connection, owner: str, cid: str, changes: Any, limits: StoreLimits, now: int
) -> dict[str, Any] | None:
    if not isinstance(changes, dict):
        raise bad_message("Changes must be an object.")
    unknown = set(changes) - UPDATE_KEYS
    if unknown:
        raise bad_message(f"Unknown conversation field {sorted(unknown)[0]!r}.")
    pk = find_pk(connection, owner, cid, lock=True) if validation.ID.fullmatch(str(cid)) else None
    if pk is None:
        return None
    values: dict[str, Any] = {}
    if "title" in changes:
        values["title"] = validation.title(changes["title"])
        values["title_source"] = validation.title_source(changes.get("title_source", "user"))
    elif "title_source" in changes:
        values["title_source"] = validation.title_source(changes["title_source"])
    if "system" in changes:
        values["system"] = validation.text(changes["system"], "system", limits.max_message_chars)
    if "model" in changes:
        values["model"] = validation.model(changes["model"])
    if "active" in changes:
        active = validation.optional_id(changes["active"], "active")
        if active is not None and not message_exists(connection, pk, active):
            raise not_found("message")
        values["active"] = active
    if set(values) - {"active", "title", "title_source"}:
        # Switching branches is not news for the sidebar's order, nor is a name (the user's
        # or the automatic one): renaming must not move the row under the pointer. New
        # settings are.
        values["updated"] = now
    if values:
        connection.execute(update(conversations).where(conversations.c.pk == pk).values(**values))
    return summary(connection, pk)


def message_exists(connection: Connection, pk: int, mid: str) -> bool:
    result = connection.execute(select(messages.c.pk).where(messages.c.conversation_pk == pk, messages.c.id == mid))
    return result.first() is not None


def remove(connection: Connection, owner: str, cid: str) -> bool:
    if not isinstance(cid, str) or not validation.ID.fullmatch(cid):
        return False
    result = connection.execute(delete(conversations).where(conversations.c.owner == owner, conversations.c.id == cid))
    return bool(result.rowcount)


def remove_owner(connection: Connection, owner: str) -> dict[str, int]:
    # The conversations' rows first, as every writer locks them (see find_pk).
    connection.execute(select(conversations.c.pk).where(conversations.c.owner == owner).with_for_update())
    counts = totals(connection, owner)
    # Messages first, in one statement: cascading one conversation at a time would walk
    # the parent links row by row.
    connection.execute(delete(messages).where(messages.c.owner == owner))
    connection.execute(delete(conversations).where(conversations.c.owner == owner))
    return {"conversations": counts["conversations"], "messages": counts["messages"]}
