"""A question and its answer in one go: what the handler reads to build the model's
context (only the branch it sends and the messages it names, not the whole tree), and
the one write transaction that adds both (quota checked once, inside it)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, bindparam, func, literal, null, select, union_all, update
from sqlalchemy.engine import Connection

from . import conversations as conversation_queries
from . import shapes, validation
from .conversations import summary
from .errors import ConversationExists, not_found
from .messages import find, insert_row
from .quotas import refuse_conversations, refuse_messages
from .schema import conversations, messages
from .validation import StoreLimits

_have = conversations.alias("have")


# Built once: making a statement costs more CPU than running it (SQLAlchemy's caching
# still has to build it to find its cache key). Parameters are bound at execute.
_CONVERSATION = select(conversations.c.pk, conversations.c.system, conversations.c.model).where(
    conversations.c.owner == bindparam("owner"), conversations.c.id == bindparam("cid")
)


def _path_select() -> Select[Any]:
    """Root .. leaf (with their depth from the leaf)."""
    ancestors = (
        select(messages.c.pk, messages.c.parent_pk, literal(0).label("depth"))
        .where(messages.c.conversation_pk == bindparam("pk"), messages.c.id == bindparam("leaf"))
        .cte("ancestors", recursive=True)
    )
    ancestors = ancestors.union_all(
        select(messages.c.pk, messages.c.parent_pk, (ancestors.c.depth + 1).label("depth")).join(
            ancestors, messages.c.pk == ancestors.c.parent_pk
        )
    )
    joined = ancestors.join(messages, messages.c.pk == ancestors.c.pk).outerjoin(
        shapes.parent_table, messages.c.parent_pk == shapes.parent_table.c.pk
    )
    return select(*shapes.message_columns(), ancestors.c.depth).select_from(joined)


def _named_select() -> Select[Any]:
    return (
        select(*shapes.message_columns(), null().label("depth"))
        .select_from(shapes.message_from())
        .where(messages.c.conversation_pk == bindparam("pk"), messages.c.id.in_(bindparam("ids", expanding=True)))
    )


_PATH = _path_select()
_NAMED = _named_select()
_PATH_AND_NAMED = union_all(_path_select(), _named_select())

_LOCK = (
    select(
        conversations.c.pk,
        select(func.count()).where(_have.c.owner == bindparam("owner")).scalar_subquery(),
        select(func.coalesce(func.sum(_have.c.message_count), 0))
        .where(_have.c.owner == bindparam("owner"))
        .scalar_subquery(),
        select(func.coalesce(func.sum(_have.c.bytes), 0)).where(_have.c.owner == bindparam("owner")).scalar_subquery(),
    )
    .where(conversations.c.owner == bindparam("owner"), conversations.c.id == bindparam("cid"))
    .with_for_update(of=conversations)
)
_KEYS = select(messages.c.pk, messages.c.id).where(
    messages.c.conversation_pk == bindparam("pk"), messages.c.id.in_(bindparam("ids", expanding=True))
)
_ADDED = (
    update(conversations)
    .where(conversations.c.pk == bindparam("b_pk"))
    .values(
        active=bindparam("new_active"),
        updated=bindparam("now"),
        bytes=conversations.c.bytes + bindparam("size"),
        message_count=conversations.c.message_count + bindparam("count"),
    )
    .returning(*(conversations.c[name] for name in shapes.CONVERSATION_FIELDS))
)


def context(connection: Connection, owner: str, cid: str, leaf: str | None, ids: set[str]) -> dict[str, Any] | None:
    """The conversation's system prompt and model, the path root .. `leaf` (empty for
    None or a leaf not there), and the messages named by `ids` (and the leaf), by id.
    None: no such conversation. Two statements, whatever the conversation's size."""
    if not validation.ID.fullmatch(cid):
        return None
    row = (connection.execute(_CONVERSATION, {"owner": owner, "cid": cid})).first()
    if row is None:
        return None
    named = sorted(i for i in ids if validation.ID.fullmatch(i))
    by_id: dict[str, dict[str, Any]] = {}
    path: list[dict[str, Any]] = []
    if leaf is not None or named:
        query = _PATH_AND_NAMED if leaf is not None and named else _PATH if leaf is not None else _NAMED
        on_path: list[tuple[int, dict[str, Any]]] = []
        params = {"pk": row.pk, "leaf": leaf, "ids": named}
        for found in (connection.execute(query, params)).all():
            message = shapes.message(found)
            by_id[message["id"]] = message
            depth = found[len(shapes.MESSAGE_FIELDS)]
            if depth is not None:
                on_path.append((depth, message))
        path = [message for _, message in sorted(on_path, key=lambda pair: -pair[0])]
    return {"system": row.system, "model": row.model, "path": path, "messages": by_id}


def add_exchange(
    connection: Connection,
    owner: str,
    cid: str,
    question: dict[str, Any] | None,
    answer: dict[str, Any],
    limits: StoreLimits,
    now: int,
    create: dict[str, Any] | None = None,
    *,
    only_new: bool = False,
) -> dict[str, Any]:
    """Adds the question (if any) and its answer, under the question or (regenerate) the
    answer's given parent; a conversation not there yet is made first from `create` (its
    fields) when given (only_new: it must not exist yet, else ConversationExists). Checks
    parent and quota (once, for both) before anything is written. Idempotent by id, like
    add_message. Returns {"question", "answer", "summary", "keys": (conversation, answer)
    row keys when the answer is new, else None} without reading them back."""
    asked = validation.message(question, limits, now) if question is not None else None
    given = validation.message(answer, limits, now)
    if not isinstance(cid, str) or not validation.ID.fullmatch(cid):
        raise not_found()
    new_fields = None  # the conversation's, when this write makes it
    if create is not None:
        new_fields = conversation_queries.new_fields({**create, "id": cid}, limits)
        have, existing = conversation_queries.owner_totals(connection, owner, cid)
        if existing is not None and only_new:
            raise ConversationExists(cid)
        if existing is not None:
            new_fields = None
        else:
            refuse_conversations(have["conversations"], limits, 1)
    wanted = {given["id"]} | ({asked["id"]} if asked is not None else set())
    parent = asked["parent"] if asked is not None else given["parent"]
    if parent is not None:
        wanted.add(parent)
    if new_fields is not None:
        pk = 0  # inserted once the checks have passed
        keys: dict[str, int] = {}  # a conversation made now has no messages
    else:
        row = connection.execute(_LOCK, {"owner": owner, "cid": cid}).first()
        if row is None:
            raise not_found()
        pk = int(row[0])
        have = {"conversations": int(row[1]), "messages": int(row[2]), "bytes": int(row[3])}
        keys = {str(mid): int(key) for key, mid in connection.execute(_KEYS, {"pk": pk, "ids": sorted(wanted)}).all()}
    adding = [m for m in (asked, given) if m is not None and m["id"] not in keys]
    if asked is not None and asked["id"] not in keys and parent is not None and parent not in keys:
        raise not_found("message")
    if asked is None and given["id"] not in keys and parent is not None and parent not in keys:
        raise not_found("message")
    size = sum(shapes.text_bytes(m["content"], m["reasoning"]) for m in adding)
    if adding:
        refuse_messages(have, limits, len(adding), size)
    made: dict[str, Any] = {"question": None, "keys": None}
    if new_fields is not None:
        # Made with its counts and active branch as they are after this write: no update.
        counts = {"active": adding[-1]["id"], "bytes": size, "message_count": len(adding)}
        pk, made["summary"] = conversation_queries.insert_new(connection, owner, new_fields | counts, now)
    if asked is not None:
        if asked["id"] in keys:
            made["question"] = find(connection, pk, asked["id"])  # sent before: it stands
        else:
            keys[asked["id"]] = insert_row(connection, owner, pk, keys.get(parent) if parent else None, asked)
            made["question"] = _shaped(asked)
        given["parent"] = asked["id"]
    if given["id"] in keys:
        made["answer"] = find(connection, pk, given["id"])
    else:
        parent_pk = keys.get(given["parent"]) if given["parent"] is not None else None
        made["keys"] = (pk, insert_row(connection, owner, pk, parent_pk, given))
        made["answer"] = _shaped(given)
    if new_fields is not None:
        made["summary"]["streaming"] = given["status"] == "streaming"
        return made
    if not adding:
        made["summary"] = summary(connection, pk)
        return made
    values = {"b_pk": pk, "new_active": adding[-1]["id"], "now": now, "size": size, "count": len(adding)}
    updated = (connection.execute(_ADDED, values)).one()
    made["summary"] = dict(zip(shapes.CONVERSATION_FIELDS, updated, strict=True))
    made["summary"]["streaming"] = True if given["status"] == "streaming" else _streaming(connection, pk)
    return made


def _streaming(connection: Connection, pk: int) -> bool:
    return (summary(connection, pk))["streaming"]  # type: ignore[no-any-return]


def _shaped(fields: dict[str, Any]) -> dict[str, Any]:
    """A message just inserted, as a read would give it (validation stored it as is)."""
    return {name: fields[name] for name in shapes.MESSAGE_FIELDS}
