"""JSON + SSE API: start, follow, stop generations; list models; health."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from server import __version__
from server.access.middleware import PRINCIPAL, client_key
from server.http.errors import ApiError
from server.http.responses import json_response
from server.http.validation import (
    parse_chat,
    parse_generation_id,
    parse_last_event_id,
    past_last_event,
    read_json_object,
)
from server.keys import (
    BUDGET,
    CATALOG,
    CLUSTER,
    CONFIG,
    GATE,
    METRICS,
    OPEN_STREAMS,
    REGISTRY,
    SESSION,
    STARTED_AT,
)
from server.relay.generation import Generation
from server.relay.streaming import check_stream_limit, serve
from server.relay.upstream import ChatRequest

if TYPE_CHECKING:
    from server.cluster.remote import RemoteAnswer

log = logging.getLogger(__name__)

STOP_WAIT_SECONDS = 5.0


def _created(generation_id: str, model: str) -> dict[str, Any]:
    return {"id": generation_id, "events": f"/api/chat/{generation_id}/events", "model": model}


def _not_found() -> ApiError:
    return ApiError(404, "generation_not_found", "No such generation (it may have expired).")


def _local(request: web.Request) -> Generation | None:
    """The generation this process streams, if it is the requester's."""
    generation = request.app[REGISTRY].get(parse_generation_id(request))
    # Another token's answer is as good as absent: its id proves nothing.
    if generation is None or (generation.owner is not None and generation.owner != request.get(PRINCIPAL)):
        return None
    return generation


async def _remote(request: web.Request) -> RemoteAnswer:
    """Shared mode: the requester's answer streamed by another process; else 404."""
    if CLUSTER not in request.app:
        raise _not_found()
    from server.cluster import remote  # redis-py: shared mode only

    answer = await remote.find(request.app[CLUSTER].redis, parse_generation_id(request))
    if answer is None or (answer.owner is not None and answer.owner != request.get(PRINCIPAL)):
        raise _not_found()
    return answer


async def announced(request: web.Request, generation: Generation) -> None:
    """Shared mode: until other processes can find the new answer (a reader may be sent
    to any of them as soon as the response arrives)."""
    if CLUSTER in request.app:
        await request.app[CLUSTER].mirror.announced(generation)


async def start_generation(
    request: web.Request,
    chat: ChatRequest,
    *,
    client_id: str | None,
    fingerprint: str,
    keep_unread: bool = False,
    launch: bool = True,
    generation_id: str | None = None,
) -> Generation:
    """Starts an answer for this request's client, within its token's daily budget.
    keep_unread: it runs to its end with no reader (a stored conversation's answer).
    launch=False: every check passed and its place is taken, but the model is asked only
    at launch_generation(); discard_generation() gives it all back."""
    app = request.app
    owner = request.get(PRINCIPAL)
    budget = app[BUDGET]
    client = client_key(request)
    generation_id = generation_id or uuid.uuid4().hex
    holder = owner if owner is not None and budget.enabled else None  # whose budget it is held on
    if holder is not None:
        chat = await budget.reserve(holder, chat, app[CONFIG].limits.max_tokens, generation_id)
    cluster = app.get(CLUSTER)
    try:
        if cluster is not None:
            await cluster.admit(client, generation_id)  # the client's limits over every process
        generation = app[REGISTRY].start(
            app[SESSION],
            chat,
            client_key=client,
            client_id=client_id,
            fingerprint=fingerprint,
            owner=owner,
            keep_unread=keep_unread,
            launch=launch,
            generation_id=generation_id,
        )
    except BaseException:
        if cluster is not None:
            cluster.forget_admitted(client, generation_id)
        if holder is not None:
            budget.release(generation_id, holder)
        raise
    return generation


def launch_generation(request: web.Request, generation: Generation) -> None:
    request.app[REGISTRY].launch(generation, request.app[SESSION])


def discard_generation(request: web.Request, generation: Generation) -> None:
    request.app[REGISTRY].discard(generation)
    request.app[BUDGET].release(generation.id, generation.owner)


async def create_chat(request: web.Request) -> web.Response:
    app = request.app
    body = await read_json_object(request)
    chat = parse_chat(body, app[CATALOG], app[CONFIG].limits)
    fingerprint = chat.fingerprint()
    registry = app[REGISTRY]
    owner = request.get(PRINCIPAL)
    # client_ids are per token: one token's ids can neither find nor block another's.
    client_id = chat.client_id if owner is None or chat.client_id is None else f"{owner}/{chat.client_id}"
    if client_id is not None and (existing := registry.find_by_client_id(client_id)):
        check_same_request(existing.fingerprint, fingerprint)
        log.info("generation %s: repeated client_id, no new upstream request", existing.id)
        return json_response(_created(existing.id, existing.request.model.id), status=200)
    generation_id = uuid.uuid4().hex
    claim = None
    if client_id is not None and CLUSTER in app:
        # Claimed in Redis first: a retry sent to another process at the same moment finds
        # this answer instead of asking the model again.
        from server.cluster.admission import Claim  # redis-py: shared mode only

        claim = Claim(generation_id, fingerprint, chat.request.model.id)
        if (earlier := await app[CLUSTER].claim(client_id, claim)) is not None:
            check_same_request(earlier.fingerprint, fingerprint)
            log.info(
                "generation %s: repeated client_id (on another process), no new upstream request", earlier.generation_id
            )
            return json_response(_created(earlier.generation_id, earlier.model), status=200)
    try:
        generation = await start_generation(
            request, chat.request, client_id=client_id, fingerprint=fingerprint, generation_id=generation_id
        )
    except BaseException:
        if client_id is not None and claim is not None:
            await app[CLUSTER].release_claim(client_id, claim)  # refused: the client_id may be used again
        raise
    await announced(request, generation)
    log.info(
        "generation %s started: model=%s messages=%d", generation.id, chat.request.model.id, len(chat.request.messages)
    )
    return json_response(_created(generation.id, generation.request.model.id), status=201)


def check_same_request(first: str, now: str) -> None:
    if first != now:
        raise ApiError(
            409,
            "client_id_reused",
            "This client_id was already used for a different request; make a new one per message.",
        )


def all_delivered(generation: Generation, after: int) -> bool:
    """Whether a client that has every event up to `after` has the whole answer (it then
    gets a 204, which tells EventSource to stop reconnecting); an id past the last event
    is refused."""
    if after > generation.last_event_id:
        raise past_last_event(after)
    terminal = generation.terminal
    return terminal is not None and after >= terminal.id


async def chat_events(request: web.Request) -> web.StreamResponse:
    generation = _local(request)
    if generation is None:
        return await _remote_events(request)
    after = parse_last_event_id(request)
    if all_delivered(generation, after):
        return web.Response(status=204)
    if after > 0:
        request.app[METRICS].resumes.inc()  # a reader coming back after a drop
    config, streams, reader = request.app[CONFIG], request.app[OPEN_STREAMS], client_key(request)
    check_stream_limit(streams, reader, config.limits.max_streams_per_client)
    response, outcome = await serve(
        request, generation, after=after, streams=streams, config=config.stream, client_key=reader
    )
    log.info("generation %s: stream from event %d ended: %s", generation.id, after, outcome.value)
    return response


async def _remote_events(request: web.Request) -> web.StreamResponse:
    """The events of an answer another process streams, read from Redis."""
    from server.cluster import remote

    answer = await _remote(request)
    app = request.app
    redis = app[CLUSTER].redis
    after = parse_last_event_id(request)
    if await remote.all_delivered(redis, answer, after):
        return web.Response(status=204)
    if after > 0:
        app[METRICS].resumes.inc()
    config, streams, reader = app[CONFIG], app[OPEN_STREAMS], client_key(request)
    check_stream_limit(streams, reader, config.limits.max_streams_per_client)
    response, outcome = await remote.serve_remote(
        request, app[CLUSTER].hub, answer, after=after, streams=streams, config=config.stream, client_key=reader
    )
    log.info(
        "generation %s (of process %s): stream from event %d ended: %s",
        answer.id,
        answer.process,
        after,
        outcome.value,
    )
    return response


async def stop_chat(request: web.Request) -> web.Response:
    generation = _local(request)
    if generation is None:
        from server.cluster import remote

        answer = await _remote(request)
        result = await remote.stop_remote(request.app[CLUSTER].redis, answer)
        log.info("generation %s (of process %s) stopped by the client", answer.id, answer.process)
        return json_response(result)
    was_live = generation.live
    generation.stop()
    try:
        async with asyncio.timeout(STOP_WAIT_SECONDS):
            await generation.wait_closed()
    except TimeoutError:
        log.warning("generation %s: upstream still closing after %g s", generation.id, STOP_WAIT_SECONDS)
    if was_live:
        log.info("generation %s stopped by the client", generation.id)
    terminal = generation.terminal
    assert terminal is not None
    return json_response(
        {"id": generation.id, "ended": terminal.name, "result": json.loads(terminal.data), "usage": generation.usage}
    )


async def list_models(request: web.Request) -> web.Response:
    return json_response(request.app[CATALOG].as_json())


async def metrics(request: web.Request) -> web.Response:
    return request.app[METRICS].response()


async def ready(request: web.Request) -> web.Response:
    """For load balancers and deploy scripts: 503 once shutdown has begun (healthz stays 200)."""
    if not request.app[REGISTRY].accepting:
        return json_response({"ready": False, "status": "shutting_down"}, status=503)
    return json_response({"ready": True, "status": "ok"})


async def health(request: web.Request) -> web.Response:
    app = request.app
    loop = asyncio.get_running_loop()
    registry = app[REGISTRY]
    status = "ok" if registry.accepting else "shutting_down"
    if app[GATE].required:
        # Public for health checkers, so it tells strangers no more than that it lives.
        return json_response({"status": status})
    return json_response(
        {
            "status": status,
            "version": __version__,
            "uptime_s": round(loop.time() - app[STARTED_AT], 3),
            "live_generations": len(registry.live()),
            "open_streams": len(app[OPEN_STREAMS]),
            "demo": app[CATALOG].demo,
        }
    )
