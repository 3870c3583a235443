"""Export documents and importing them back: one owner's conversations as JSON that
imports exactly (idempotent by ids; existing messages are left as they are)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from server.http.errors import ApiError

from . import messages as message_queries
from . import shapes, validation
from .conversations import find_pk, insert_row
from .errors import bad_document, not_found
from .quotas import check_conversations, check_messages
from .schema import conversations, messages
from .validation import StoreLimits

FORMAT = "rill.conversations"
VERSION = 1
MAX_CONVERSATIONS = 100_000  # in one document: a bound on work before the quota check


def export(connection: Connection, owner: str, ids: list[str] | None, now: int) -> dict[str, Any]:
    query = select(conversations.c.pk, *(conversations.c[name] for name in shapes.CONVERSATION_FIELDS)).where(
        conversations.c.owner == owner
    )
    if ids is not None:
        wanted = set(ids)
        if not all(isinstance(cid, str) and validation.ID.fullmatch(cid) for cid in wanted):
            raise not_found()
        query = query.where(conversations.c.id.in_(wanted))
    # Ordered by data alone (not by internal keys), so an export after import matches.
    query = query.order_by(conversations.c.updated.desc(), conversations.c.id)
    rows = (connection.execute(query)).all()
    if ids is not None and len(rows) != len(set(ids)):
        raise not_found()
    documents = []
    for row in rows:
        conversation = {name: row._mapping[name] for name in shapes.CONVERSATION_FIELDS}
        conversation["messages"] = message_queries.of_conversation(connection, row.pk)
        documents.append(conversation)
    return {"format": FORMAT, "version": VERSION, "exported": now, "conversations": documents}


def parse(document: Any, limits: StoreLimits) -> list[dict[str, Any]]:
    """The whole document checked before anything is written; messages' parents must come
    before them (so forward references and cycles are refused)."""
    if not isinstance(document, dict):
        raise bad_document("the document must be a JSON object.")
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise bad_document(f'expected "format": "{FORMAT}" and "version": {VERSION}.')
    items = document.get("conversations")
    if not isinstance(items, list) or len(items) > MAX_CONVERSATIONS:
        raise bad_document(f'"conversations" must be a list of at most {MAX_CONVERSATIONS}.')
    parsed = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        try:
            conversation = _conversation(item, limits)
        except ApiError as error:
            if error.status == 413:
                raise
            raise bad_document(f"conversation {index}: {error.message}") from None
        if conversation["id"] in seen:
            raise bad_document(f"conversation {conversation['id']!r} appears twice.")
        seen.add(conversation["id"])
        parsed.append(conversation)
    return parsed


CONVERSATION_KEYS = frozenset({*shapes.CONVERSATION_FIELDS, "messages"})


def _conversation(item: Any, limits: StoreLimits) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise bad_document("a conversation must be an object.")
    unknown = set(item) - CONVERSATION_KEYS - {"streaming"}
    if unknown:
        raise bad_document(f"unknown field {sorted(unknown)[0]!r}.")
    missing = CONVERSATION_KEYS - set(item)
    if missing:
        raise bad_document(f"missing field {sorted(missing)[0]!r}.")
    if not isinstance(item["title"], str):
        raise bad_document("title must be a string.")
    conversation: dict[str, Any] = {
        "id": validation.valid_id(item["id"], "conversation id"),
        "title": validation.title(item["title"]),
        "title_source": validation.title_source(item["title_source"]),
        "system": validation.text(item["system"], "system", limits.max_message_chars),
        "model": validation.model(item["model"]),
        "active": validation.optional_id(item["active"], "active"),
        "created": validation.timestamp(item["created"], "created"),
        "updated": validation.timestamp(item["updated"], "updated"),
    }
    items = item["messages"]
    if not isinstance(items, list):
        raise bad_document("messages must be a list.")
    parsed: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, data in enumerate(items):
        if not isinstance(data, dict) or set(validation.MESSAGE_KEYS) - set(data):
            raise bad_document(f"message {index} must be an object with every field of an export.")
        fields = validation.message(data, limits, 0, imported=True)
        if fields["id"] in seen:
            raise bad_document(f"message {fields['id']!r} appears twice.")
        if fields["parent"] is not None and fields["parent"] not in seen:
            raise bad_document(f"message {fields['id']!r}: its parent must come before it in the same conversation.")
        seen.add(fields["id"])
        parsed.append(fields)
    if conversation["active"] is not None and conversation["active"] not in seen:
        raise bad_document(f"active {conversation['active']!r} is not a message of this conversation.")
    conversation["messages"] = parsed
    return conversation


def import_document(connection: Connection, owner: str, document: Any, limits: StoreLimits) -> dict[str, int]:
    parsed = parse(document, limits)
    # What is new, and whether it fits the quotas, before the first write.
    plan: list[tuple[dict[str, Any], int | None, set[str]]] = []
    new_conversations = new_messages = new_bytes = 0
    for conversation in parsed:
        pk = find_pk(connection, owner, conversation["id"], lock=True)
        existing: set[str] = set()
        if pk is None:
            new_conversations += 1
        else:
            rows = connection.execute(select(messages.c.id).where(messages.c.conversation_pk == pk))
            existing = {row.id for row in rows}
        for fields in conversation["messages"]:
            if fields["id"] not in existing:
                new_messages += 1
                new_bytes += shapes.text_bytes(fields["content"], fields["reasoning"])
        plan.append((conversation, pk, existing))
    if new_conversations:
        check_conversations(connection, owner, limits, new_conversations)
    if new_messages:
        check_messages(connection, owner, limits, new_messages, new_bytes)
    for conversation, pk, existing in plan:
        _write(connection, owner, conversation, pk, existing)
    return {"conversations": new_conversations, "messages": new_messages}


def _write(
    connection: Connection, owner: str, conversation: dict[str, Any], pk: int | None, existing: set[str]
) -> None:
    fields = {name: conversation[name] for name in ("id", "title", "title_source", "system", "model", "active")}
    if pk is None:
        pk = insert_row(connection, owner, fields, conversation["created"], conversation["updated"])
    keys: dict[str, int] = {}
    if existing:
        rows = connection.execute(select(messages.c.id, messages.c.pk).where(messages.c.conversation_pk == pk))
        keys = {row.id: row.pk for row in rows}
    added = count = 0
    for message in conversation["messages"]:
        if message["id"] in keys:
            continue  # already stored: left as it is
        parent_pk = None if message["parent"] is None else keys[message["parent"]]
        keys[message["id"]] = message_queries.insert_row(connection, owner, pk, parent_pk, message)
        added += shapes.text_bytes(message["content"], message["reasoning"])
        count += 1
    if count:
        connection.execute(
            update(conversations)
            .where(conversations.c.pk == pk)
            .values(bytes=conversations.c.bytes + added, message_count=conversations.c.message_count + count)
        )
