"""Opt-in GET /stream?prompt= for clients written against the classic Express relay tutorial.

Off by default: a GET that spends tokens can be triggered by any page (CSRF).

Every event names its generation in its id (`<generation id>.<event id>`), so the
automatic reconnect of the tutorial page's EventSource, which repeats the same URL with
`Last-Event-ID`, resumes the same answer instead of asking the model again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from server.access.middleware import PRINCIPAL, client_key
from server.http.errors import ApiError
from server.http.validation import raw_last_event_id
from server.http.views_api import all_delivered, start_generation
from server.keys import CATALOG, CLUSTER, CONFIG, METRICS, OPEN_STREAMS, REGISTRY
from server.relay.generation import Event, Generation
from server.relay.streaming import check_stream_limit, serve
from server.relay.upstream import ChatRequest

if TYPE_CHECKING:
    from server.cluster.remote import RemoteAnswer

log = logging.getLogger(__name__)

STREAM_END = "[STREAM_END]"
_LAST_EVENT_ID = re.compile(r"([0-9a-f]{32})\.([0-9]{1,12})")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # as aiohttp-sse splits data into lines
_SURROGATE = re.compile("[\ud800-\udfff]")


def _block(text: str, *, event_id: str | None = None, name: str | None = None) -> bytes:
    """One SSE event as aiohttp-sse's send(text, id=, event=) frames it: one `data:` line
    per line of text, so EventSource joins them back with LF (a lone CR arrives as LF)."""
    fields = [f"id: {event_id}\r\n" if event_id is not None else ""]
    if name is not None:
        fields.append(f"event: {name}\r\n")
    fields.extend(f"data: {line}\r\n" for line in _LINE_BREAK.split(text))
    fields.append("\r\n")
    block = "".join(fields)
    try:
        return block.encode()
    except UnicodeEncodeError:
        # A lone surrogate (half an emoji the upstream split) cannot be UTF-8; the API
        # keeps it escaped in JSON, plain text can only show it as U+FFFD.
        return _SURROGATE.sub("\ufffd", block).encode()


def plain_text_encoder(generation_id: str) -> Callable[[Event], bytes]:
    """Deltas as plain `data:` lines, then the end marker; every event carries its id."""

    def encode(event: Event) -> bytes:
        event_id = f"{generation_id}.{event.id}"
        if event.name == "delta":
            text = json.loads(event.data)["text"]
            if text == STREAM_END:
                # A token that is the end marker would end the page early: as two events
                # the page still joins the same text, and only the real end is the marker.
                # The first has no id: only a connection cut between the two repeats it.
                return _block(STREAM_END[:8]) + _block(STREAM_END[8:], event_id=event_id)
            return _block(text, event_id=event_id)
        if event.name == "meta":
            # No data, so EventSource fires nothing, but it keeps the id: a connection
            # dropped before the first token resumes too, instead of starting over.
            return f"id: {event_id}\r\n\r\n".encode()
        if event.name == "error":
            # The error without an id: a drop between the two resumes before both.
            message = _block(json.loads(event.data)["message"], name="error")
            return message + _block(STREAM_END, event_id=event_id)
        if event.name == "done":
            return _block(STREAM_END, event_id=event_id)
        return b""  # reasoning and usage: not part of this format

    return encode


def _fingerprint(request: ChatRequest) -> str:
    """Ties a generation to the /stream URL that started it (EventSource repeats it)."""
    canonical = json.dumps(["GET /stream", request.model.id, request.messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _last_event_id(request: web.Request) -> tuple[str, int] | None:
    """The header EventSource sends when it reconnects (or ?last_event_id=, as on the API)."""
    raw = raw_last_event_id(request)
    if not raw:
        return None
    match = _LAST_EVENT_ID.fullmatch(raw)
    if match is None:
        message = "Last-Event-ID on /stream must be an id this endpoint sent (<generation>.<event>)."
        raise ApiError(400, "bad_last_event_id", message)
    return match[1], int(match[2])


def _not_found() -> ApiError:
    return ApiError(404, "generation_not_found", "No such generation (it may have expired).")


def _resumable(request: web.Request, generation: Generation | RemoteAnswer | None, fingerprint: str) -> None:
    # Another token's, another client's or another prompt's answer is as good as absent.
    if (
        generation is None
        or generation.owner != request.get(PRINCIPAL)
        or generation.client_key != client_key(request)
        or generation.fingerprint != fingerprint
    ):
        raise _not_found()


async def _resume_elsewhere(
    request: web.Request, generation_id: str, after: int, fingerprint: str
) -> web.StreamResponse:
    """Shared mode: the answer another process streams, from Redis, in this format (the
    reconnect of EventSource may reach any process)."""
    from server.cluster import remote  # redis-py: shared mode only

    app = request.app
    config, cluster = app[CONFIG], app[CLUSTER]
    answer = await remote.find(cluster.redis, generation_id)
    _resumable(request, answer, fingerprint)
    assert answer is not None
    if await remote.all_delivered(cluster.redis, answer, after):
        return web.Response(status=204)
    reader = client_key(request)
    check_stream_limit(app[OPEN_STREAMS], reader, config.limits.max_streams_per_client)
    app[METRICS].resumes.inc()
    response, outcome = await remote.serve_remote(
        request,
        cluster.hub,
        answer,
        after=after,
        streams=app[OPEN_STREAMS],
        config=config.stream,
        client_key=reader,
        encode=plain_text_encoder(answer.id),
    )
    log.info(
        "generation %s (of process %s): /stream from event %d ended: %s",
        answer.id,
        answer.process,
        after,
        outcome.value,
    )
    return response


async def legacy_stream(request: web.Request) -> web.StreamResponse:
    app = request.app
    config = app[CONFIG]
    if not config.compat.get_stream:
        raise ApiError(404, "not_found", "There is nothing at this address.")
    # A GET carries no Origin to check, but the browser says who started it.
    if request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
        raise ApiError(403, "cross_site_request", "Requests started by another web site are not accepted.")
    prompt = request.query.get("prompt", "")
    if not prompt.strip():
        raise ApiError(400, "missing_prompt", "Add ?prompt=... with the question to ask.")
    if len(prompt) > config.limits.max_message_chars:
        raise ApiError(
            400, "message_too_long", f"The prompt is longer than {config.limits.max_message_chars} characters."
        )
    catalog = app[CATALOG]
    resolved = catalog.resolve(catalog.default_model)
    assert resolved is not None
    provider, model = resolved
    chat = ChatRequest(provider=provider, model=model, messages=({"role": "user", "content": prompt},))
    fingerprint = _fingerprint(chat)
    resume = _last_event_id(request)
    reader = client_key(request)
    if resume is not None:
        found = app[REGISTRY].get(resume[0])
        if found is None and CLUSTER in app:
            return await _resume_elsewhere(request, resume[0], resume[1], fingerprint)
        _resumable(request, found, fingerprint)
        assert found is not None
        generation, after = found, resume[1]
        if all_delivered(generation, after):
            return web.Response(status=204)
        check_stream_limit(app[OPEN_STREAMS], reader, config.limits.max_streams_per_client)
        app[METRICS].resumes.inc()
    else:
        check_stream_limit(app[OPEN_STREAMS], reader, config.limits.max_streams_per_client)
        generation = await start_generation(request, chat, client_id=None, fingerprint=fingerprint)
        after = 0
    # Like the API's streams: a gone client leaves the answer running for resume_grace
    # (the generation's own timer), so EventSource's reconnect can pick it up.
    response, outcome = await serve(
        request,
        generation,
        after=after,
        streams=app[OPEN_STREAMS],
        config=config.stream,
        client_key=reader,
        encode=plain_text_encoder(generation.id),
    )
    log.info("generation %s: /stream from event %d ended: %s", generation.id, after, outcome.value)
    return response
