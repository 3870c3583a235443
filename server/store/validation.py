"""Checks on what callers and import documents hand the store, before anything is
written: ids, roles, statuses, sizes and the optional fields' types."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import bad_id, bad_message, too_long
from .shapes import MESSAGE_FIELDS, storable

ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
ROLES = ("user", "assistant")
STATUSES = ("done", "streaming", "stopped", "length", "filtered", "error", "abandoned", "interrupted")
TITLE_SOURCES = (None, "user", "auto")
MAX_TITLE_CHARS = 500
MAX_MODEL_CHARS = 200
MAX_JSON_CHARS = 10_000  # a message's error or usage object, serialized


@dataclass(frozen=True)
class StoreLimits:
    """Per owner; reads and deletes stay allowed over them."""

    max_conversations: int
    max_messages: int
    max_bytes: int
    max_message_chars: int


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def valid_id(value: Any, field: str = "id") -> str:
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise bad_id(field)
    return value


def optional_id(value: Any, field: str) -> str | None:
    return None if value is None else valid_id(value, field)


def text(value: Any, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise bad_message(f"{field} must be a string.")
    if len(value) > limit:
        raise too_long(limit)
    return storable(value)


def title(value: Any) -> str:
    if not isinstance(value, str):
        raise bad_message("title must be a string.")
    # A title is one line; the page shows it in the sidebar.
    return storable(" ".join(value.split()))[:MAX_TITLE_CHARS]


def model(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_MODEL_CHARS:
        raise bad_message(f"model must be a string of 1 to {MAX_MODEL_CHARS} characters, or null.")
    return storable(value)


def title_source(value: Any) -> str | None:
    if value not in TITLE_SOURCES:
        raise bad_message('title_source must be "user", "auto" or null.')
    return value  # type: ignore[no-any-return]


def short(value: Any, field: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise bad_message(f"{field} must be a string of at most {limit} characters, or null.")
    return storable(value)


def json_object(value: Any, field: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(repr(value)) > MAX_JSON_CHARS:
        raise bad_message(f"{field} must be an object (at most {MAX_JSON_CHARS} characters), or null.")
    return value


def error_object(value: Any) -> dict[str, Any] | None:
    checked = json_object(value, "error")
    if checked is not None and not (
        isinstance(checked.get("code"), str)
        and isinstance(checked.get("message"), str)
        and isinstance(checked.get("retryable"), bool)
    ):
        raise bad_message('error must be {"code": str, "message": str, "retryable": bool}, or null.')
    return checked


def timestamp(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise bad_message(f"{field} must be a time in milliseconds.")
    return value


def counter(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise bad_message(f"{field} must be a non-negative integer.")
    return value


MESSAGE_KEYS = frozenset(MESSAGE_FIELDS)  # the one shape, as shapes.py gives it


def message(data: Any, limits: StoreLimits, now: int, *, imported: bool = False) -> dict[str, Any]:
    """A message to insert, every field checked; `parent` stays a public id (or None)."""
    if not isinstance(data, dict):
        raise bad_message("A message must be an object.")
    unknown = set(data) - (MESSAGE_KEYS if imported else MESSAGE_KEYS - {"created", "updated"})
    if unknown:
        raise bad_message(f"Unknown message field {sorted(unknown)[0]!r}.")
    role = data.get("role")
    if role not in ROLES:
        raise bad_message('role must be "user" or "assistant".')
    status = data.get("status", "done")
    if status not in STATUSES:
        raise bad_message(f"status must be one of {', '.join(STATUSES)}.")
    if role == "user" and status != "done":
        raise bad_message('A user message\'s status is "done".')
    if imported and status == "streaming":
        # Nothing is writing an imported answer: it shows as interrupted, text kept.
        status = "interrupted"
    created = timestamp(data["created"], "created") if imported else now
    updated = timestamp(data["updated"], "updated") if imported else now
    return {
        "id": valid_id(data.get("id"), "message id") if data.get("id") is not None or imported else new_id(),
        "parent": optional_id(data.get("parent"), "parent"),
        "role": role,
        "content": text(data.get("content", ""), "content", limits.max_message_chars),
        "reasoning": text(data.get("reasoning", ""), "reasoning", limits.max_message_chars),
        "status": status,
        "model": model(data.get("model")),
        "finish_reason": short(data.get("finish_reason"), "finish_reason", 32),
        "error": error_object(data.get("error")),
        "usage": json_object(data.get("usage"), "usage"),
        "generation": optional_id(data.get("generation"), "generation"),
        "last_event_id": counter(data.get("last_event_id", 0), "last_event_id"),
        "created": created,
        "updated": updated,
    }
