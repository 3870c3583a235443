"""Opt-in GET /stream?prompt= for clients written against the classic Express relay tutorial.

Off by default: a GET that spends tokens can be triggered by any page (CSRF).
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .access import client_key
from .errors import ApiError
from .generation import Event
from .keys import CATALOG, CONFIG, OPEN_STREAMS
from .streaming import check_stream_limit, serve
from .upstream import ChatRequest
from .views_api import start_generation

log = logging.getLogger(__name__)

STREAM_END = "[STREAM_END]"


async def write_plain_text(response: EventSourceResponse, event: Event) -> None:
    """Deltas as plain `data:` lines (aiohttp-sse splits multi-line text), then the end marker."""
    if event.name == "delta":
        await response.send(json.loads(event.data)["text"])
    elif event.name == "error":
        await response.send(json.loads(event.data)["message"], event="error")
        await response.send(STREAM_END)
    elif event.name == "done":
        await response.send(STREAM_END)


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
    reader = client_key(request)
    check_stream_limit(app[OPEN_STREAMS], reader, config.limits.max_streams_per_client)
    catalog = app[CATALOG]
    resolved = catalog.resolve(catalog.default_model)
    assert resolved is not None
    provider, model = resolved
    generation = start_generation(
        request,
        ChatRequest(provider=provider, model=model, messages=({"role": "user", "content": prompt},)),
        client_id=None,
        fingerprint="",
    )
    try:
        response, outcome = await serve(
            request,
            generation,
            after=0,
            streams=app[OPEN_STREAMS],
            config=config.stream,
            client_key=reader,
            write_event=write_plain_text,
            retry_hint=False,
        )
        log.info("generation %s: /stream ended: %s", generation.id, outcome.value)
    finally:
        generation.stop()  # no resume on this endpoint: a gone client ends the upstream now
    return response
