"""Rows to the one JSON shape used everywhere (API, export, store return values)."""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy import ColumnElement, Select, exists, select
from sqlalchemy.orm import aliased

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

_parent = aliased(messages, name="parent")


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
    mapping = row._mapping
    return {name: mapping[name] for name in CONVERSATION_FIELDS} | {"streaming": bool(mapping["streaming"])}


def message_select() -> Select[Any]:
    """Messages with their parent's public id; the caller adds the WHERE."""
    columns = [messages.c[name] for name in MESSAGE_FIELDS if name != "parent"]
    return (
        select(*columns, _parent.c.id.label("parent"))
        .select_from(messages.outerjoin(_parent, messages.c.parent_pk == _parent.c.pk))
        .order_by(messages.c.pk)
    )


def message(row: Any) -> dict[str, Any]:
    mapping = row._mapping
    shaped = {name: mapping[name] for name in MESSAGE_FIELDS}
    for name in ("error", "usage"):
        if shaped[name] is not None:
            shaped[name] = json.loads(shaped[name])
    return shaped


def dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def text_bytes(content: str, reasoning: str) -> int:
    return len(content.encode()) + len(reasoning.encode())


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """NUL (PostgreSQL's text cannot hold it) and lone surrogates (JSON allows them, UTF-8
    does not) become U+FFFD, the same on both backends."""
    return _UNSTORABLE.sub("\ufffd", text)
