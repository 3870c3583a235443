"""Checking what clients send: every problem becomes an ApiError with a stable code."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from server.config import LimitsConfig
from server.http.bodies import read_body
from server.http.errors import ApiError
from server.relay.catalog import Catalog
from server.relay.upstream import ChatRequest

ROLES = frozenset({"system", "user", "assistant"})
_GENERATION_ID = re.compile(r"[0-9a-f]{32}")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # valid JSON escapes, but not text any API accepts


@dataclass(frozen=True, slots=True)
class ChatInput:
    request: ChatRequest
    client_id: str | None

    def fingerprint(self) -> str:
        """Identifies the request, so a reused client_id with other content is caught."""
        r = self.request
        canonical = json.dumps(
            [r.model.id, r.messages, r.temperature, r.max_tokens],
            ensure_ascii=False,
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def invalid(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Send the body as JSON with Content-Type: application/json.")
    raw = await read_body(request)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise invalid("bad_json", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise invalid("invalid_body", "The request body must be a JSON object.")
    return body


def parse_chat(body: dict[str, Any], catalog: Catalog, limits: LimitsConfig) -> ChatInput:
    unknown = set(body) - {"messages", "model", "client_id", "options"}
    if unknown:
        raise invalid("unknown_field", f"Unknown field {sorted(unknown)[0]!r} in the request body.")

    messages = _parse_messages(body.get("messages"), limits)

    model_id = body.get("model", catalog.default_model)
    if model_id is None:
        model_id = catalog.default_model
    if not isinstance(model_id, str):
        raise invalid("invalid_model", "'model' must be a string.")
    resolved = catalog.resolve(model_id)
    if resolved is None:
        raise invalid("unknown_model", f"Unknown model {model_id!r}; GET /api/models lists the available ones.")
    provider, model = resolved

    client_id = body.get("client_id")
    if client_id is not None:
        if not isinstance(client_id, str):
            raise invalid("invalid_client_id", "'client_id' must be a UUID string.")
        try:
            client_id = str(uuid.UUID(client_id))
        except ValueError:
            raise invalid("invalid_client_id", "'client_id' must be a UUID made by the client.") from None

    temperature, max_tokens = _parse_options(body.get("options"), limits)
    request = ChatRequest(provider, model, messages, temperature, max_tokens)
    return ChatInput(request, client_id)


def _parse_messages(value: Any, limits: LimitsConfig) -> tuple[dict[str, str], ...]:
    if value is None:
        raise invalid("missing_messages", "'messages' is required: a list of {role, content}.")
    if not isinstance(value, list):
        raise invalid("invalid_messages", "'messages' must be a list of {role, content}.")
    if not value:
        raise invalid("empty_messages", "'messages' is empty: send at least one message.")
    if len(value) > limits.max_messages:
        raise invalid(
            "too_many_messages",
            f"Too many messages ({len(value)}); the limit is {limits.max_messages}. Start a new conversation.",
        )
    messages = []
    total = 0
    for index, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"role", "content"}:
            raise invalid("invalid_message", f"messages[{index}] must be an object with only 'role' and 'content'.")
        role, content = item.get("role"), item.get("content")
        if not isinstance(role, str) or role not in ROLES:
            got = ascii(role[:40]) if isinstance(role, str) else f"a JSON {_json_type(role)}"
            raise invalid("invalid_role", f"messages[{index}].role must be one of system, user, assistant; got {got}.")
        if not isinstance(content, str):
            raise invalid("invalid_content", f"messages[{index}].content must be a string.")
        if _SURROGATE.search(content):
            raise invalid("invalid_content", f"messages[{index}].content is not valid Unicode text.")
        if len(content) > limits.max_message_chars:
            raise invalid(
                "message_too_long",
                f"messages[{index}] has {len(content)} characters; the limit is {limits.max_message_chars}.",
            )
        total += len(content)
        messages.append({"role": role, "content": content})
    if total > limits.max_total_chars:
        raise invalid(
            "conversation_too_long",
            f"The conversation has {total} characters; the limit is {limits.max_total_chars}. "
            "Start a new conversation.",
        )
    return tuple(messages)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages (never its repr: it may be huge or deep)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "array" if isinstance(value, list) else "object"


def _parse_options(value: Any, limits: LimitsConfig) -> tuple[float | None, int | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise invalid("invalid_options", "'options' must be an object.")
    unknown = set(value) - {"temperature", "max_tokens"}
    if unknown:
        raise invalid("unknown_option", f"Unknown option {sorted(unknown)[0]!r}.")
    temperature = value.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise invalid("invalid_temperature", "options.temperature must be a number from 0 to 2.")
        if not 0 <= temperature <= 2:  # also false for NaN and for ints too big for a float
            raise invalid("invalid_temperature", "options.temperature must be a number from 0 to 2.")
        temperature = float(temperature)
    max_tokens = value.get("max_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise invalid("invalid_max_tokens", "options.max_tokens must be a positive integer.")
        if max_tokens > limits.max_tokens:
            raise invalid(
                "max_tokens_too_high",
                f"options.max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}.",
            )
    return temperature, max_tokens


def parse_generation_id(request: web.Request) -> str:
    generation_id = request.match_info["id"]
    if not _GENERATION_ID.fullmatch(generation_id):
        raise ApiError(404, "generation_not_found", "No such generation (it may have expired).")
    return generation_id


def raw_last_event_id(request: web.Request) -> str:
    """Last-Event-ID from the header, or ?last_event_id= for clients that cannot set it
    ("" when neither is there)."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.query.get("last_event_id")
    return raw or ""


def past_last_event(after: int) -> ApiError:
    """A Last-Event-ID past the answer's last event: it came from some other answer."""
    return ApiError(400, "bad_last_event_id", f"Last-Event-ID {after} is past the last event of this generation.")


def parse_last_event_id(request: web.Request) -> int:
    raw = raw_last_event_id(request)
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise invalid("bad_last_event_id", "Last-Event-ID must be a non-negative integer event id.")
    return int(raw)
