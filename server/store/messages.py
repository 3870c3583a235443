"""Queries on messages: add one under its parent, the path from a root to a leaf, the
answer writer's saves, and start-up recovery."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, insert, literal, select, update
from sqlalchemy.engine import Connection

from . import shapes, validation
from .conversations import require_pk
from .errors import not_found
from .quotas import check_messages
from .schema import conversations, messages
from .validation import StoreLimits

# A conversation's messages without the join to each one's parent: the parents are among
# them, so their public ids are looked up here (opening 2,000 messages: 2,000 fewer probes).
# The parent's key comes where its id goes, and the row's own key last.
_TREE = (
    select(*(messages.c.parent_pk if name == "parent" else messages.c[name] for name in shapes.MESSAGE_FIELDS))
    .add_columns(messages.c.pk)
    .where(messages.c.conversation_pk == bindparam("pk"))
    .order_by(messages.c.pk)
)


def of_conversation(connection: Connection, pk: int) -> list[dict[str, Any]]:
    """All messages of the tree, parents before children (insertion order), oldest first."""
    rows = connection.execute(_TREE, {"pk": pk}).all()  # one fetch, not one per row
    ids = {row[-1]: row[0] for row in rows}
    return [shapes.message_with_parent(row, ids.get(row[1])) for row in rows]


_FIND = shapes.message_select().where(messages.c.conversation_pk == bindparam("pk"), messages.c.id == bindparam("mid"))
_FIND_PK = select(messages.c.pk).where(messages.c.conversation_pk == bindparam("pk"), messages.c.id == bindparam("mid"))


def find(connection: Connection, pk: int, mid: str) -> dict[str, Any] | None:
    row = connection.execute(_FIND, {"pk": pk, "mid": mid}).first()
    return None if row is None else shapes.message(row)


def find_pk(connection: Connection, pk: int, mid: str) -> int | None:
    return connection.execute(_FIND_PK, {"pk": pk, "mid": mid}).scalar_one_or_none()


def add(connection: Connection, owner: str, cid: str, data: Any, limits: StoreLimits, now: int) -> dict[str, Any]:
    fields = validation.message(data, limits, now)
    pk = require_pk(connection, owner, cid, lock=True)
    existing = find(connection, pk, fields["id"])
    if existing is not None:
        return existing  # the same request again (idempotent by id): nothing changes
    parent_pk = None
    if fields["parent"] is not None:
        parent_pk = find_pk(connection, pk, fields["parent"])
        if parent_pk is None:
            raise not_found("message")
    size = shapes.text_bytes(fields["content"], fields["reasoning"])
    check_messages(connection, owner, limits, 1, size)
    insert_row(connection, owner, pk, parent_pk, fields)
    connection.execute(
        update(conversations)
        .where(conversations.c.pk == pk)
        .values(
            active=fields["id"],
            updated=now,
            bytes=conversations.c.bytes + size,
            message_count=conversations.c.message_count + 1,
        )
    )
    added = find(connection, pk, fields["id"])
    assert added is not None
    return added


def insert_row(
    connection: Connection, owner: str, conversation_pk: int, parent_pk: int | None, fields: dict[str, Any]
) -> int:
    values = {name: value for name, value in fields.items() if name != "parent"}
    values["error"] = shapes.dumps(values["error"])
    values["usage"] = shapes.dumps(values["usage"])
    values.update(owner=owner, conversation_pk=conversation_pk, parent_pk=parent_pk)
    return int((connection.execute(_INSERT, values)).scalar_one())


_INSERT = insert(messages).returning(messages.c.pk)  # built once; the values come at execute


def path(connection: Connection, owner: str, cid: str, leaf: Any) -> list[dict[str, Any]]:
    """Root .. leaf: the branch the model is shown."""
    pk = require_pk(connection, owner, cid)
    if not isinstance(leaf, str) or not validation.ID.fullmatch(leaf):
        raise not_found("message")
    ancestors = (
        select(messages.c.pk, messages.c.parent_pk, literal(0).label("depth"))
        .where(messages.c.conversation_pk == pk, messages.c.id == leaf)
        .cte("ancestors", recursive=True)
    )
    ancestors = ancestors.union_all(
        select(messages.c.pk, messages.c.parent_pk, (ancestors.c.depth + 1).label("depth")).join(
            ancestors, messages.c.pk == ancestors.c.parent_pk
        )
    )
    query = (
        shapes.message_select()
        .join(ancestors, messages.c.pk == ancestors.c.pk)
        .order_by(None)
        .order_by(ancestors.c.depth.desc())
    )
    found = [shapes.message(row) for row in (connection.execute(query)).all()]
    if not found:
        raise not_found("message")
    return found


def save_answer(connection: Connection, owner: str, cid: str, mid: str, values: dict[str, Any], now: int) -> None:
    """The answer writer's flush: never refused for quota (the answer was accepted)."""
    pk = require_pk(connection, owner, cid, lock=True)
    row = (
        connection.execute(
            select(messages.c.pk, messages.c.content, messages.c.reasoning).where(
                messages.c.conversation_pk == pk, messages.c.id == mid
            )
        )
    ).first()
    if row is None:
        raise not_found("message")
    values["content"] = shapes.storable(values["content"])
    values["reasoning"] = shapes.storable(values["reasoning"])
    delta = shapes.text_bytes(values["content"], values["reasoning"]) - shapes.text_bytes(row.content, row.reasoning)
    connection.execute(update(messages).where(messages.c.pk == row.pk).values(updated=now, **values))
    connection.execute(
        update(conversations).where(conversations.c.pk == pk).values(updated=now, bytes=conversations.c.bytes + delta)
    )


def mark_interrupted(connection: Connection, now: int) -> int:
    result = connection.execute(
        update(messages).where(messages.c.status == "streaming").values(status="interrupted", updated=now)
    )
    return int(result.rowcount)
