"""Rows to the one JSON shape used everywhere (API, export, store return values)."""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy import ColumnElement, Select, exists, select

from server.jsoncodec import loads

from .schema import conversations, messages

CONVERSATION_FIELDS = ("id", "title", "title_source", "system", "model", "active", "created", "updated")
MESSAGE_FIELDS = (
    "id",
    "parent",
    "role",
    "content",
    "reasoning",
    "status",
    "model",
    "finish_reason",
    "error",
    "usage",
    "generation",
    "last_event_id",
    "created",
    "updated",
)

# Core's alias: the ORM (~6 MB more) is not needed.
parent_table = messages.alias("parent")
_parent = parent_table


def streaming_flag() -> ColumnElement[bool]:
    """Whether an answer of this conversation is being written right now."""
    return (
        exists()
        .where(messages.c.conversation_pk == conversations.c.pk, messages.c.status == "streaming")
        .label("streaming")
    )


def summary_select() -> Select[Any]:
    return select(*(conversations.c[name] for name in CONVERSATION_FIELDS), streaming_flag())


def summary(row: Any) -> dict[str, Any]:
    """A row of summary_select(): CONVERSATION_FIELDS in order, then the streaming flag
    (then any columns a caller added, left out)."""
    shaped = dict(zip(CONVERSATION_FIELDS, row, strict=False))
    shaped["streaming"] = bool(row[len(CONVERSATION_FIELDS)])
    return shaped


def message_select() -> Select[Any]:
    """Messages with their parent's public id; the caller adds the WHERE."""
    return select(*message_columns()).select_from(message_from()).order_by(messages.c.pk)


def message_columns() -> list[Any]:
    """MESSAGE_FIELDS in order, the parent's public id from parent_table."""
    return [_parent.c.id.label("parent") if name == "parent" else messages.c[name] for name in MESSAGE_FIELDS]


def message_from() -> Any:
    return messages.outerjoin(_parent, messages.c.parent_pk == _parent.c.pk)


def message(row: Any) -> dict[str, Any]:
    """A row of message_select(): its first columns are MESSAGE_FIELDS, in order; any
    columns a caller added after them are left out."""
    return message_with_parent(row, row[1])


def message_with_parent(row: Any, parent: str | None) -> dict[str, Any]:
    """The message of a row whose first columns are MESSAGE_FIELDS (the second, the
    parent, replaced by `parent`). Opening a conversation of thousands of messages spends
    its time here: one dict display, sized once (a third of dict(zip(...))'s time)."""
    mid, _, role, content, reasoning, status, model, finish_reason, error, usage, generation, last, created, updated = (
        row[:14]
    )
    return {
        "id": mid,
        "parent": parent,
        "role": role,
        "content": content,
        "reasoning": reasoning,
        "status": status,
        "model": model,
        "finish_reason": finish_reason,
        "error": None if error is None else loads(error),
        "usage": None if usage is None else loads(usage),
        "generation": generation,
        "last_event_id": last,
        "created": created,
        "updated": updated,
    }


def dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def text_bytes(content: str, reasoning: str) -> int:
    return len(content.encode()) + len(reasoning.encode())


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """NUL (PostgreSQL's text cannot hold it) and lone surrogates (JSON allows them, UTF-8
    does not) become U+FFFD, the same on both backends."""
    return _UNSTORABLE.sub("\ufffd", text)
